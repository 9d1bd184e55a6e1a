"""The HTTP servers: our own (`python -m api`) and `mlx_lm.server`, each a subprocess on a free
loopback port, driven through `/v1/completions` (raw text, greedy, streamed), so that no chat
template differs between them. Figures: TTFT and decode rate of single requests, the cached-prefix
pair, and the aggregate rate of concurrent clients, each a thread with a connection of its own."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from importlib.metadata import version
from pathlib import Path

from bench.harness import Server, log_tail, mapped_blas, peak_rss, running_server
from bench.serving.results import LABELS, Result, Sample, failed, record, record_rounds
from bench.serving.workload import Workload

log = logging.getLogger("serve_bench")


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
               logs: Path, describe) -> Result:
    """Start the server, measure it, stop it; `describe(server)` gives the row's note while it still runs.
    A failure becomes the row's error, with the end of the server's log in ours."""
    import httpx

    log_path = logs / f"{engine}.log"
    try:
        with running_server(command, env, log_path, ready_path) as server:
            log.info("%s: listening on port %d", engine, server.port)
            result = measure_server(engine, server, model, work)
            result.note = describe(server)
            return result
    except (httpx.HTTPError, RuntimeError, OSError, ValueError) as exc:
        log.error("%s failed: %s; the end of its log:\n%s", engine, exc, log_tail(log_path))
        return failed(engine, str(exc).splitlines()[0][:200])


def impetus_note(server: Server) -> str:
    """What our server chose: layout, BLAS threads, decode threads by batch size, sgemm's library, fast ops."""
    import httpx

    status = httpx.get(server.url + "/api/models/status", timeout=10).json()
    runtime, tuning = status.get("runtime", {}), status.get("tuning") or {}
    by_batch = ", ".join(f"{size}: {threads}" for size, threads in (tuning.get("batch_threads") or {}).items())
    return (f"layout {status.get('layout')} with {tuning.get('threads')} BLAS thread(s) ({tuning.get('reason')}); "
            f"decode threads measured on the traffic, by batch size: {by_batch or 'none yet'}; "
            f"sgemm from {Path(runtime.get('sgemm_from', '?')).name}; "
            f"CPU fast ops: {', '.join(runtime.get('cpu_fast_ops') or []) or 'none'}")


def mlx_server_note(server: Server) -> str:
    return f"mlx-lm {version('mlx-lm')} server, checkpoint as converted (its batching on)"
