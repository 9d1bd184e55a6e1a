"""Convert any local model file or folder into a cached MLX checkpoint, and manage the cache.

    python convert.py <file-or-folder> [--json] [--progress-json] [--bits N] [--group-size N] [--dtype D] [--context N]
                      [--allow-bad-weights]
    python convert.py <file-or-folder> --plan [--json]     how it would be stored here, and why
    python convert.py --list | --remove ID | --verify ID [--json] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

from cache.store import ModelStore
from converters.pipeline import Conversion, ensure_converted
from errors import ImpetusError
from settings import Settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert a model file or folder into a cached MLX checkpoint.")
    parser.add_argument("source", type=Path, nargs="?", help="model file or folder (GGUF, SafeTensors, PyTorch, ONNX, Core ML, MLX)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    parser.add_argument("--progress-json", action="store_true",
                        help='report progress as JSON lines on stderr: {"stage", "done", "total"}')
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: IMPETUS_HOME)")
    sizing = parser.add_argument_group("storage (default: the best quality that fits this machine's memory)")
    sizing.add_argument("--bits", type=int, help="quantise to 2, 3, 4, 5, 6 or 8 bits (16 or 32: floats); never above the source's")
    sizing.add_argument("--group-size", type=int, help="weights per quantisation group: 32, 64 (default) or 128")
    sizing.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="dtype of the unquantised tensors")
    sizing.add_argument("--context", type=int, help="context length to leave KV-cache room for (default: the model's, at most 32768)")
    parser.add_argument("--allow-bad-weights", action="store_true",
                        help="convert even when weights hold NaN or infinity or a probe's logits are unusable (warns; for debugging a model)")
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--plan", action="store_true", help="print how the source would be stored, and why, without converting")
    actions.add_argument("--list", action="store_true", help="list the cached models")
    actions.add_argument("--remove", metavar="ID", help="remove a cached model (refused while a server uses it)")
    actions.add_argument("--verify", metavar="ID", help="re-hash a cached model's files, test-load it with mlx-lm and check its numbers")
    return parser.parse_args(argv)


def conversion_options(args: argparse.Namespace) -> dict:
    chosen = {"bits": args.bits, "group_size": args.group_size, "dtype": args.dtype, "context": args.context}
    return {name: value for name, value in chosen.items() if value is not None}


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
        "checks": checks_line(entry.checks),
    }
    return "\n".join(f"{name:<13} {value}" for name, value in rows.items())


def checks_line(checks: dict) -> str:
    if not checks:
        return "none recorded (converted before numeric checks; run --verify ID)"
    weights, probe = checks["weights"], checks["probe"]
    verdict = "passed" if checks["passed"] else "FAILED (converted with --allow-bad-weights)"
    return (f"{verdict}: {weights['nonfinite_values']:,} NaN/Inf values in {weights['tensors_checked']} tensors; "
            f"{probe['tokens']}-token probe logits {'finite' if probe['finite'] else 'not finite'}")


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
            "checks": entry.checks,
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
        self.bars.update((id(bar), bar) for bar in live_progress_bars())
        for key, bar in self.bars.items():
            state = (bar.desc, bar.n, bar.total)
            if self.reported.get(key) != state:
                self.reported[key] = state
                self.out.write(json.dumps({"stage": bar.desc, "done": bar.n, "total": bar.total}) + "\n")
        self.out.flush()


def live_progress_bars() -> list:
    tqdm_module = sys.modules.get("tqdm.std")  # tqdm is imported only by a conversion
    return list(tqdm_module.tqdm._instances) if tqdm_module else []


def close_progress_bars() -> None:
    """Clear the bars of a conversion that stopped midway, so that its error starts a line of its own."""
    for bar in live_progress_bars():
        bar.close()


def progress_reporting(enabled: bool):
    return contextlib.redirect_stderr(ProgressLines(sys.stderr)) if enabled else contextlib.nullcontext()


def convert(args: argparse.Namespace, store: ModelStore) -> str:
    with progress_reporting(args.progress_json):
        result = ensure_converted(required_source(args), store, conversion_options(args), args.allow_bad_weights)
    return as_json(result) if args.json else summary(result)


def required_source(args: argparse.Namespace) -> Path:
    if args.source is None:
        raise ImpetusError("give a model file or folder to convert (or use --list, --remove ID, --verify ID)")
    return args.source


def show_plan(args: argparse.Namespace, store: ModelStore) -> str:
    from converters.pipeline import plan_conversion

    plan = plan_conversion(required_source(args), conversion_options(args))
    return json.dumps(plan.as_dict()) if args.json else plan.explanation()


def list_entries(args: argparse.Namespace, store: ModelStore) -> str:
    rows = [entry_row(store, entry) for entry in sorted(store.entries(), key=lambda e: e.last_used, reverse=True)]
    if args.json:
        return json.dumps(rows)
    if not rows:
        return f"no cached models in {store.home}"
    lines = [f"{'id':<32} {'quantization':<34} {'size':>10}  {'last used':<16}  in use"]
    for row in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["last_used"]))
        users = ", ".join(map(str, row["in_use_by"])) or "-"
        lines.append(f"{row['id']:<32} {row['quantization']:<34} {row['size_bytes'] / 1e6:>8.1f}MB  {used:<16}  {users}")
    return "\n".join(lines)


def entry_row(store: ModelStore, entry) -> dict:
    return {
        "id": entry.id, "key": entry.key, "path": str(store.checkpoint_path(entry)), "format": entry.format,
        "architecture": entry.architecture, "quantization": entry.quantization, "options": entry.options,
        "size_bytes": entry.size_bytes, "created": entry.created, "last_used": entry.last_used,
        "in_use_by": store.users(entry.key),
    }


def remove_entry(args: argparse.Namespace, store: ModelStore) -> str:
    entry = store.remove(args.remove)
    if args.json:
        return json.dumps({"removed": entry.id, "key": entry.key, "size_bytes": entry.size_bytes})
    return f"removed {entry.id} ({entry.size_bytes / 1e6:,.1f} MB)"


def verify_entry(args: argparse.Namespace, store: ModelStore) -> str:
    from cache.verify import verify_entry as verify

    report = verify(store, args.verify)
    if args.json:
        return json.dumps(report)
    return (f"ok: {report['id']}: {report['files_checked']} files match their sha256 at conversion; mlx-lm loads it; "
            f"no NaN or infinity in its {report['weights']['tensors_checked']} tensors; "
            f"a {report['probe']['tokens']}-token probe gives finite, varied logits")


def command(args: argparse.Namespace):
    if args.plan:
        return show_plan
    if args.list:
        return list_entries
    if args.remove:
        return remove_entry
    if args.verify:
        return verify_entry
    return convert


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        store = ModelStore(args.cache_dir or Settings.from_env().home)
        output = command(args)(args, store)
    except ImpetusError as exc:
        close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
