"""Raw mlx-lm, the floor every server is measured against: `stream_generate` on the converted
checkpoint (as converted, or dequantised to float32 as our server does on a CPU), and `batch_generate`
in-process for concurrent clients, with no HTTP. Runs inside a worker process (see `workers`), so
that its LD_PRELOAD and peak RSS are its own."""

from __future__ import annotations

import logging
import time

from bench.harness import mapped_blas, peak_rss
from bench.serving.results import LABELS, Result, Sample, record, record_rounds
from bench.serving.workload import Workload

log = logging.getLogger("serve_bench")


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
