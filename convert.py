"""Convert any local model file or folder into a cached MLX checkpoint.

    python convert.py <file-or-folder> [--json] [--progress-json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from cache.store import ModelStore
from converters.errors import ImpetusError
from converters.pipeline import Conversion, ensure_converted
from settings import Settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert a model file or folder into a cached MLX checkpoint.")
    parser.add_argument("source", type=Path, help="GGUF file (more formats to come) or model folder")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a summary")
    parser.add_argument("--progress-json", action="store_true",
                        help='report progress as JSON lines on stderr: {"stage", "done", "total"}')
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    return parser.parse_args(argv)


def summary(result: Conversion) -> str:
    entry = result.entry
    rows = {
        "model id": entry.id,
        "format": entry.format,
        "architecture": entry.architecture,
        "parameters": f"{entry.parameters / 1e6:,.1f} M",
        "quantization": entry.quantization,
        "context": entry.context_length,
        "size": f"{entry.size_bytes / 1e6:,.1f} MB",
        "path": result.path,
        "time": f"{result.seconds:.2f} s" + (" (cached)" if result.cached else ""),
    }
    return "\n".join(f"{name:<13} {value}" for name, value in rows.items())


def as_json(result: Conversion) -> str:
    entry = result.entry
    return json.dumps(
        {
            "id": entry.id,
            "key": entry.key,
            "path": str(result.path),
            "format": entry.format,
            "architecture": entry.architecture,
            "parameters": entry.parameters,
            "quantization": entry.quantization,
            "context_length": entry.context_length,
            "size_bytes": entry.size_bytes,
            "seconds": round(result.seconds, 3),
            "cached": result.cached,
        }
    )


class ProgressLines(io.TextIOBase):
    """Stands in for stderr while converting: tqdm's bars become JSON lines, other text passes through."""

    def __init__(self, out):
        self.out = out
        self.bars: dict[int, object] = {}
        self.reported: dict[int, tuple] = {}

    def write(self, text: str) -> int:
        # tqdm redraws with a leading carriage return, and writes "" when it closes a bar.
        if text and not text.startswith("\r"):
            return self.out.write(text)
        self._report_bars()
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def _report_bars(self) -> None:
        tqdm_module = sys.modules.get("tqdm.std")
        live = tqdm_module.tqdm._instances if tqdm_module else ()
        self.bars.update((id(bar), bar) for bar in list(live))
        for key, bar in self.bars.items():
            state = (bar.desc, bar.n, bar.total)
            if self.reported.get(key) != state:
                self.reported[key] = state
                self.out.write(json.dumps({"stage": bar.desc, "done": bar.n, "total": bar.total}) + "\n")
        self.out.flush()


def progress_reporting(enabled: bool):
    return contextlib.redirect_stderr(ProgressLines(sys.stderr)) if enabled else contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store = ModelStore(Settings.from_env().home)
    try:
        with progress_reporting(args.progress_json):
            result = ensure_converted(args.source, store)
    except ImpetusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 2
    print(as_json(result) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
