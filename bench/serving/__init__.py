"""The pieces of `bench/serve_bench.py`: the workload every engine gets, what a run yields, the engines
(raw mlx-lm and llama.cpp in child processes, the HTTP servers), the report with the issue's goals,
and the chart."""
