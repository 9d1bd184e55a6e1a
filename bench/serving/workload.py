"""The workload: the same raw-text prompts for every engine, sized in the model's own tokens, written
once to JSON for the worker processes to load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FILLER = (
    "A local language model server keeps one model resident and answers requests from coding agents. "
    "Each request carries a system prompt, the description of the tools, and the history of the task. "
    "The server tokenises the text, runs the prompt through every layer to fill the key and value cache, "
    "and then samples one token at a time until the answer is complete or the budget is spent. "
    "Throughput depends on the matrix products of the prefill, on the memory traffic of each decode step, "
    "and on how many sequences share one pass through the weights when several clients are waiting. "
)
TASK = "\n\nWrite a detailed numbered list of the steps a server takes for one request:\n1."


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
