"""The numbers a checkpoint must hold before the cache takes it, or keeps it after `convert.py --verify`:
no NaN or infinity in its weights, and a probe of a few tokens through the model whose logits are
finite and not all the same.

A damaged download, or split parts joined out of order, keeps a file's header and sizes, so every
structural check passes; the model then answers every prompt with token 0 (the argmax of NaN logits).
The count finds that in the weights themselves, as llama.cpp's `--check-tensors` does; the probe also
catches weights that are finite but flatten the output (zeroed, or lost to a bad join).

Quantised layers are counted through their scales and biases: each dequantised weight is
scale * q + bias over small integer codes, so it is finite exactly when they are. MXFP4's
power-of-two scales are bytes, whose value 255 means NaN.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from errors import BadWeightsError

log = logging.getLogger(__name__)

MAX_NAMED = 5  # a refusal names this many bad tensors, and stops counting there
# Two positions, so attention mixes them; each costs a pass over every weight (0.1 s for SmolLM2-135M
# on MLX's naive CPU quantised kernels), and the checks must stay a small part of a conversion.
PROBE_TOKEN_IDS = (1, 1000)  # taken modulo the vocabulary
E8M0_NAN = 255
# What a refused conversion tells the user to do next.
CONVERSION_ADVICE = ("The file is probably an incomplete or corrupt download, or split parts joined out of order: "
                     "download it again, or join its parts in their numbered order. Nothing was cached. "
                     "To convert it anyway (to debug the model), pass --allow-bad-weights.")


@dataclass(frozen=True)
class BadTensor:
    name: str
    nan: int
    inf: int
    size: int

    def describe(self) -> str:
        return f"'{self.name}' ({self.nan:,} NaN and {self.inf:,} infinite of {self.size:,} values)"


def bad_values(name: str, array) -> BadTensor | None:
    """The tensor's NaN and ±Inf counts, or None when it has none. Evaluates the tensor, once."""
    import mlx.core as mx

    if mx.issubdtype(array.dtype, mx.floating):
        bad = mx.logical_not(mx.isfinite(array)).sum()
        mx.eval(array, bad)  # together, so the writer finds the tensor computed and does not compute it again
        if not bad.item():
            return None
        nan = mx.isnan(array).sum().item()
        return BadTensor(name, nan, bad.item() - nan, array.size)
    if name.endswith(".scales") and array.dtype == mx.uint8:
        nan = (array == E8M0_NAN).sum().item()
        return BadTensor(name, nan, 0, array.size) if nan else None
    return None  # integer codes: their scales and biases carry the values


@dataclass
class FiniteCheck:
    """Counts NaN and ±Inf in the tensors of a conversion as they pass; refuses the conversion once
    MAX_NAMED tensors are bad, or at the end, unless `allow_bad`, which only warns."""

    label: str
    allow_bad: bool = False
    advice: str = CONVERSION_ADVICE
    tensors: int = 0
    seconds: float = 0.0
    bad: list[BadTensor] = field(default_factory=list)

    def watch(self, tensors):
        """Pass (name, array) pairs through, counting each; concludes when they run out."""
        for name, array in tensors:
            self.inspect(name, array)
            yield name, array
        self.conclude()

    def scan(self, tensors) -> None:
        for _ in self.watch(tensors):
            pass

    def scan_files(self, files: list[Path]) -> None:
        """Count every tensor of these safetensors files (shards the writer adopts whole)."""
        import mlx.core as mx

        self.scan(pair for file in files for pair in mx.load(str(file)).items())

    def inspect(self, name: str, array) -> None:
        started = time.perf_counter()
        found = bad_values(name, array)
        self.seconds += time.perf_counter() - started
        self.tensors += 1
        if found:
            self.bad.append(found)
            if len(self.bad) >= MAX_NAMED and not self.allow_bad:
                raise self.refusal(complete=False)

    def conclude(self) -> None:
        if not self.bad:
            return
        if not self.allow_bad:
            raise self.refusal(complete=True)
        log.warning("%s: converting despite NaN or infinite values in %d tensors, first %s",
                    self.label, len(self.bad), self.bad[0].describe())

    def refusal(self, complete: bool) -> BadWeightsError:
        named = ", ".join(bad.describe() for bad in self.bad[:MAX_NAMED])
        more = "" if complete else f" (the check stopped after {MAX_NAMED} tensors)"
        plural = "s" if len(self.bad) > 1 else ""
        return BadWeightsError(f"{self.label}: NaN or infinite weights in tensor{plural} {named}{more}. {self.advice}")

    def report(self) -> dict:
        return {"tensors_checked": self.tensors, "nonfinite_tensors": [bad.name for bad in self.bad],
                "nonfinite_values": sum(bad.nan + bad.inf for bad in self.bad), "seconds": round(self.seconds, 4)}


def probe_model(model, vocab_size: int | None) -> dict:
    """Logits of a few tokens: whether all are finite, and how far apart the last position's are."""
    import mlx.core as mx

    started = time.perf_counter()
    tokens = [token % vocab_size for token in PROBE_TOKEN_IDS] if vocab_size else [0, 1]
    logits = model(mx.array([tokens])).astype(mx.float32)
    finite = bool(mx.all(mx.isfinite(logits)).item())
    last = logits[0, -1]
    spread = (mx.max(last) - mx.min(last)).item() if finite else None
    return {"tokens": len(tokens), "finite": finite, "logit_spread": spread,
            "seconds": round(time.perf_counter() - started, 4)}


def probe_problem(result: dict) -> str | None:
    if not result["finite"]:
        return "a probe of a few tokens gives NaN or infinite logits"
    if not result["logit_spread"] > 0:
        return "a probe of a few tokens gives the same logit for every token (weights zeroed or lost)"
    return None


def probe_checkpoint(folder: Path, label: str, allow_bad: bool = False, advice: str = CONVERSION_ADVICE) -> dict:
    """Load the checkpoint in `folder` with mlx-lm and probe it; refuse it (or, if `allow_bad`, warn)."""
    from mlx_lm.utils import load_model

    started = time.perf_counter()
    model, config = load_model(folder, lazy=True)
    result = judged_probe(model, config, label, allow_bad, advice)
    return {**result, "seconds": round(time.perf_counter() - started, 4)}  # the load included


def judged_probe(model, config: dict, label: str, allow_bad: bool, advice: str) -> dict:
    result = probe_model(model, vocabulary_size(config))
    if problem := probe_problem(result):
        if not allow_bad:
            raise BadWeightsError(f"{label}: {problem}. {advice}")
        log.warning("%s: converting despite a failed probe: %s", label, problem)
    return result


def vocabulary_size(config: dict) -> int | None:
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def checks_summary(weights: dict, probe: dict) -> dict:
    """What an entry records of its checks: the weights' count, the probe, and whether both passed."""
    return {"passed": not weights["nonfinite_tensors"] and probe_problem(probe) is None, "weights": weights, "probe": probe}
