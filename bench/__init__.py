"""Benchmarks, one script a benchmark, run from the repository root as `.venv/bin/python bench/NAME.py`.

`harness` holds what they share (child processes and servers on free loopback ports, peak RSS,
markdown tables, the machine); `serving` holds the pieces of `serve_bench.py`. bench may import any
module of the project; nothing of the project imports bench (tests may).
"""
