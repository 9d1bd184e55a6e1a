"""Convert any local model file or folder into a cached MLX checkpoint.

    python convert.py <file-or-folder> [--json]
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store = ModelStore(Settings.from_env().home)
    try:
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
