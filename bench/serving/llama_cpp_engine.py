"""llama.cpp as a peer: llama-cpp-python on the GGUF itself, in-process inside a worker process (see
`workers`). It holds one sequence per context, so concurrency is not measured: its aggregate is one
client's rate. Optional (the `bench` extra)."""

from __future__ import annotations

import logging
import os
import time

from bench.harness import peak_rss
from bench.serving.results import LABELS, Result, Sample, record, record_rounds
from bench.serving.workload import Workload

log = logging.getLogger("serve_bench")


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
