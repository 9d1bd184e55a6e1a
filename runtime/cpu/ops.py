"""Leaner CPU versions of three of MLX's fused ops: RoPE, RMS norm, and attention of one query.

On a GPU, `mx.fast.rope`, `rms_norm` and `scaled_dot_product_attention` are one kernel each. On the
CPU, MLX builds each call from a fallback graph of 10 to 25 small ops instead (RoPE recomputes its
frequencies, sines and cosines every time), and for a small model each op costs more to schedule than
to compute: these fallbacks make about half of the 4,067 ops of a SmolLM2-135M decode step. The
versions here give the same results in a few ops a call: RoPE and RMS norm as one fused
(`mx.compile`) elementwise kernel each (RoPE's partner features gathered by slicing), and attention
of a single query (every decode step) as two products and a softmax, with the query heads of a
key/value group stacked instead of the keys repeated.

Two more replace work on exponentials. MLX's x86 CPU wheel computes `exp` (and so sigmoid, softmax
and logsumexp) one element at a time with a polynomial whose every multiply-add is a call into libm's
`fmaf` (it is built without FMA instructions): about 10 ns an element. The same polynomial as plain
multiply-adds in a fused kernel is 4-5 times faster and within 2e-7 of MLX's. It serves the SwiGLU of
decode steps and prompts (`swiglu` of mlx-lm's models: a 330-token SmolLM2 prompt spent 220 ms in it)
and `mx.logsumexp` over a batch of logits (every sampled token), whose costs grow with the batch (a step
of four float32 SmolLM2 sequences 36.1 -> 34.2 ms),
and the softmax of one query over a long context (with the forwarding library's kernel for weights
times values, a SmolLM2 step at 6,000 positions 68 -> 59 ms).

Attention over a prompt's positions goes to `prompt_attention` (NumPy's softmax) once it has enough
scores.

`install()` puts them in place (`mx.fast`, `mx.logsumexp`, and the `swiglu` that mlx-lm's model
modules imported) when MLX computes on the CPU; whatever they do not cover (an explicit stream,
attention sinks, a prompt's few scores, grouped heads that do not divide, other dtypes and shapes)
goes on to MLX's own.
"""

from __future__ import annotations

import logging
import math
import sys
from functools import lru_cache, partial

from runtime.cpu import prompt_attention

log = logging.getLogger(__name__)

REPLACED = ("rope", "rms_norm", "scaled_dot_product_attention", "logsumexp", "swiglu")
originals: dict = {}  # name -> MLX's (or mlx-lm's) own function, while ours are installed


def install() -> list[str]:
    """Swap this module's versions in if MLX computes on the CPU; the names swapped."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return []
    if not originals:
        log.info("MLX computes on the CPU: %s use runtime/cpu/ops.py", ", ".join(REPLACED))
    for name, (owner, ours) in places().items():
        originals.setdefault(name, getattr(owner, name))
        setattr(owner, name, ours)
    swap_swiglu()
    return list(REPLACED)


def uninstall() -> None:
    for name, (owner, _) in places().items():
        if name in originals:
            setattr(owner, name, originals[name])
    if "swiglu" in originals:
        swap_in_model_modules(swiglu, originals["swiglu"])
    originals.clear()


def places() -> dict:
    """Where each replaced function lives, and ours."""
    import mlx.core as mx

    return {"rope": (mx.fast, rope), "rms_norm": (mx.fast, rms_norm),
            "scaled_dot_product_attention": (mx.fast, scaled_dot_product_attention),
            "logsumexp": (mx, logsumexp)}


def swap_swiglu() -> None:
    """mlx-lm's model modules import `swiglu` by name: ours goes into each one imported so far (a
    model's load calls install() again, after its module is imported), and into the one they import
    it from, so that modules imported later take ours too."""
    from mlx_lm.models import activations

    originals.setdefault("swiglu", activations.swiglu)
    swap_in_model_modules(originals["swiglu"], swiglu)


def swap_in_model_modules(old, new) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "swiglu", None) is old:
            module.swiglu = new


def installed() -> list[str]:
    return list(originals)


def original(name: str):
    """MLX's (or mlx-lm's) own version of a replaced function, installed or not."""
    import mlx.core as mx
    from mlx_lm.models import activations

    if name in originals:
        return originals[name]
    return activations.swiglu if name == "swiglu" else getattr(mx, name, None) or getattr(mx.fast, name)


# ---------------------------------------------------------------------------------------------------
# RMS norm


@lru_cache(maxsize=None)
def rms_kernel(eps: float, weighted: bool):
    import mlx.core as mx

    @partial(mx.compile, shapeless=True)
    def normalise(x, *weight):
        wide = x.astype(mx.float32)  # as MLX's: the mean of squares in float32 whatever the input
        out = (wide * mx.rsqrt(mx.mean(mx.square(wide), axis=-1, keepdims=True) + eps)).astype(x.dtype)
        return out * weight[0] if weighted else out

    return normalise


def rms_norm(x, weight, eps: float, *, stream=None):
    if stream is not None:
        return original("rms_norm")(x, weight, eps, stream=stream)
    kernel = rms_kernel(float(eps), weight is not None)
    return kernel(x, weight) if weight is not None else kernel(x)


# ---------------------------------------------------------------------------------------------------
# RoPE


@lru_cache(maxsize=64)
def signs(head: int, dims: int, traditional: bool):
    """Each feature's partner enters with this sign: (x1, x2) -> (-x2, x1); 0 past `dims`."""
    import mlx.core as mx

    pair = [-1.0, 1.0]
    if traditional:
        sign = pair * (dims // 2)
    else:
        sign = [pair[0]] * (dims // 2) + [pair[1]] * (dims // 2)
    table = mx.array(sign + [0.0] * (head - dims))
    mx.eval(table)
    return table


def partners(a, dims: int, traditional: bool):
    """Each rotated feature's partner, unsigned: (x1, x2) -> (x2, x1); features past `dims` as they are."""
    import mlx.core as mx

    if traditional:  # consecutive pairs swap places
        return a.reshape(*a.shape[:-1], -1, 2)[..., ::-1].reshape(a.shape)
    half = dims // 2
    return mx.concatenate([a[..., half:dims], a[..., :half], a[..., dims:]], axis=-1)


@lru_cache(maxsize=64)
def base_frequencies(head: int, dims: int, traditional: bool, base: float):
    import mlx.core as mx

    half = dims // 2
    return spread(mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(base) / half)), head, traditional)


custom_frequencies: dict[int, tuple] = {}  # id(freqs) -> (freqs, spread inverse): the model keeps freqs


def given_frequencies(freqs, head: int, dims: int, traditional: bool):
    import mlx.core as mx

    key = (id(freqs), head, dims, traditional)
    if key not in custom_frequencies:
        if len(custom_frequencies) > 64:
            custom_frequencies.clear()
        custom_frequencies[key] = (freqs, spread(mx.reciprocal(freqs.astype(mx.float32)), head, traditional))
    return custom_frequencies[key][1]


def spread(inverse, head: int, traditional: bool):
    """One angular frequency per feature: each pair's twice, 0 (no turn) for features past `dims`."""
    import mlx.core as mx

    pairs = mx.repeat(inverse, 2) if traditional else mx.concatenate([inverse, inverse])
    full = mx.concatenate([pairs, mx.zeros((head - pairs.size,), mx.float32)])
    mx.eval(full)
    return full


@lru_cache(maxsize=1)
def angle_kernel():
    import mlx.core as mx

    # Apart from the turn, which would take them again for every head (sines and cosines cost
    # several times a multiply-add on the CPU, and more so in a batch).
    @partial(mx.compile, shapeless=True)
    def cos_sin(position, scale, frequencies, sign):
        angle = (position * scale) * frequencies
        return mx.cos(angle), mx.sin(angle) * sign

    return cos_sin


@lru_cache(maxsize=1)
def turn_kernel():
    import mlx.core as mx

    @partial(mx.compile, shapeless=True)
    def turn(x, partner, cos, signed_sin):
        return (x * cos + partner * signed_sin).astype(x.dtype)

    return turn


def rope(a, dims: int, *, traditional: bool, base, scale: float, offset, freqs=None, stream=None):
    import mlx.core as mx

    head = a.shape[-1]
    # Several positions (a prompt): MLX's own, which takes each angle's sine and cosine once for all
    # heads, where the fused kernel would take them for every element.
    if stream is not None or a.ndim < 3 or a.shape[-2] > 1 or dims % 2 or head % 2 or dims > head:
        return original("rope")(a, dims, traditional=traditional, base=base, scale=scale, offset=offset,
                                freqs=freqs, stream=stream)
    frequencies = (base_frequencies(head, dims, traditional, float(base)) if freqs is None
                   else given_frequencies(freqs, head, dims, traditional))
    cos, signed_sin = angle_kernel()(positions(offset, a.ndim), mx.array(scale, mx.float32), frequencies,
                                     signs(head, dims, traditional))
    return turn_kernel()(a, partners(a, dims, traditional), cos, signed_sin)


def positions(offset, ndim: int):
    """The one position, shaped to broadcast over (B, *, 1, D): one per batch row for a vector."""
    import mlx.core as mx

    if isinstance(offset, int):
        return mx.array(float(offset), mx.float32)
    start = offset.astype(mx.float32)
    return start.reshape(-1, *[1] * (ndim - 1)) if start.ndim == 1 else start


# ---------------------------------------------------------------------------------------------------
# Attention


def scaled_dot_product_attention(q, k, v, *, scale: float, mask=None, sinks=None, force_fused: bool = False,
                                 stream=None):
    if stream is None and prompt_attention.covers(q, k, v, mask, sinks):
        repeats, length = q.shape[1] // k.shape[1], q.shape[2]
        return grouped_attention(q, k, v, scale, lambda scores: prompt_attention.softmax(scores, mask, repeats, length))
    if not single_query(q, k, mask) or stream is not None or sinks is not None:
        return original("scaled_dot_product_attention")(q, k, v, scale=scale, mask=mask, sinks=sinks,
                                                        force_fused=force_fused, stream=stream)
    # One query: "causal" masks nothing (the query is the last position).
    heads, groups = q.shape[1], k.shape[1]
    return grouped_attention(q, k, v, scale,
                             lambda scores: softmax(masked(scores, mask, heads, groups)).astype(v.dtype))


def grouped_attention(q, k, v, scale: float, weigh):
    """Attention with each key/value group's query heads (and their queries) stacked into the rows of one
    product, so that the keys are used as they are, never repeated; `weigh(scores)` gives the weights."""
    batch, heads, length, depth = q.shape
    groups = k.shape[1]
    rows = (q * scale).reshape(batch, groups, heads // groups * length, depth)
    return (weigh(rows @ k.swapaxes(-1, -2)) @ v).reshape(batch, heads, length, depth)


def single_query(q, k, mask) -> bool:
    """One query per sequence, whole groups of query heads, and a mask this module can reshape."""
    plain_mask = mask is None or isinstance(mask, str) or mask.ndim in (1, 2, 4)
    return q.ndim == 4 and k.ndim == 4 and q.shape[2] == 1 and q.shape[1] % k.shape[1] == 0 and plain_mask


def masked(scores, mask, query_heads: int, groups: int):
    import mlx.core as mx

    if mask is None or isinstance(mask, str):
        return scores
    if mask.ndim == 4 and mask.shape[1] == query_heads and query_heads != groups:
        mask = mask.reshape(mask.shape[0], groups, query_heads // groups, mask.shape[-1])
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return scores + mask


def softmax(scores):
    import mlx.core as mx

    wide = scores.astype(mx.float32)
    if wide.shape[-1] < LONG_CONTEXT:
        return mx.softmax(wide, axis=-1, precise=True)
    exponentials, normalised = softmax_kernels()
    power, bits = exponentials(wide, mx.max(wide, axis=-1, keepdims=True))
    return normalised(power, bits.view(mx.float32))


@lru_cache(maxsize=1)
def softmax_kernels():
    """e^(x - max) in two parts, and their normalised product: a bit cast in between, since compiled
    kernels of any shape (the keys grow every step) cannot hold one."""
    import mlx.core as mx

    @partial(mx.compile, shapeless=True)
    def exponentials(scores, top):
        return exp_parts(scores - top)

    @partial(mx.compile, shapeless=True)
    def normalised(power, scale):
        weights = power * scale
        return weights / mx.sum(weights, axis=-1, keepdims=True)

    return exponentials, normalised


# ---------------------------------------------------------------------------------------------------
# Exponentials

LOG2E = 1.4426950408889634
# Added and taken away, rounds a float32 under 2^22 to the nearest integer: the kernels MLX compiles here
# target plain x86-64, where `floor` is a libm call an element (a batch of four's logsumexp 981 -> 764 us).
ROUNDER = 1.5 * 2**23
# 2^f for f in [-0.5, 0.5], highest power first: the polynomial MLX's CPU `exp` uses.
EXP2_POLYNOMIAL = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
                   2.402264791363012e-1, 6.931472028550421e-1, 1.0)
MOST_ROWS = 16  # batches of decode steps; each new shape is traced once, so larger ones stay MLX's
# Attention over this many keys or more takes our softmax: four more ops a layer, which its faster
# exponentials repay from 512-1,024 keys (a SmolLM2 query's 9 heads: 173 -> 144 us at 1,024, 674 -> 411
# us at 6,144, so 20 -> 12 ms over the 30 layers of a step).
LONG_CONTEXT = 1024


def exp(x):
    """e^x from multiply-adds and an exponent built in the float's bits; traced into fused kernels
    compiled per shape (a bit cast needs its shape known)."""
    import mlx.core as mx

    power, bits = exp_parts(x)
    return power * bits.view(mx.float32)


def exp_parts(x):
    """e^x as a polynomial and the float32 bits of a power of two, to be multiplied."""
    import mlx.core as mx

    x = x * LOG2E
    whole = (mx.clip(x, -127.0, 128.0) + ROUNDER) - ROUNDER  # 2^128 is the bit pattern of infinity
    fraction, power = x - whole, EXP2_POLYNOMIAL[0]
    for coefficient in EXP2_POLYNOMIAL[1:]:
        power = power * fraction + coefficient
    # Below 2^-126 a float is no longer normal: zero. 2^-127's bits are those of 0.0 anyway.
    power = mx.where(x < -126.0, 0.0, mx.where(x > 128.0, mx.inf, power))
    return power, mx.left_shift(whole.astype(mx.int32) + 127, 23)


@lru_cache(maxsize=1)
def swiglu_kernel():
    import mlx.core as mx

    @mx.compile
    def silu_times(gate, x):
        return gate / (1.0 + exp(-gate)) * x

    return silu_times


@lru_cache(maxsize=1)
def prompt_swiglu_kernels():
    """For any shape (a prompt's length differs every time): the exponential's parts, then the product."""
    import mlx.core as mx

    @partial(mx.compile, shapeless=True)
    def parts(gate):
        return exp_parts(-gate)

    @partial(mx.compile, shapeless=True)
    def combine(gate, x, power, scale):
        return gate / (1.0 + power * scale) * x

    return parts, combine


def swiglu(gate, x):
    """SiLU(gate) * x, as mlx-lm's; ours for float32. One kernel for a decode step's batch, and two
    shapeless ones with a bit cast between for a prompt (SmolLM2's MLP at 330 positions: 7.5 -> 2.1 ms)."""
    import mlx.core as mx

    if gate.dtype != mx.float32 or x.dtype != mx.float32 or gate.shape != x.shape:
        return original("swiglu")(gate, x)
    if gate.ndim == 3 and gate.shape[1] == 1 and gate.shape[0] <= MOST_ROWS:
        return swiglu_kernel()(gate, x)
    parts, combine = prompt_swiglu_kernels()
    power, bits = parts(gate)
    return combine(gate, x, power, bits.view(mx.float32))


@lru_cache(maxsize=1)
def logsumexp_kernel():
    import mlx.core as mx

    @mx.compile
    def rows(x):
        top = mx.max(x, axis=-1, keepdims=True)
        shift = mx.where(mx.isinf(top), 0.0, top)  # all -inf stays -inf, and +inf stays +inf
        return shift + mx.log(mx.sum(exp(x - shift), axis=-1, keepdims=True))

    return rows


def logsumexp(a, axis=None, keepdims: bool = False, *, stream=None):
    """As `mx.logsumexp`; ours along the last axis of a few float32 rows (a batch's logits)."""
    import mlx.core as mx

    last = isinstance(axis, int) and axis in (-1, 1)
    if stream is not None or not last or a.ndim != 2 or a.shape[0] > MOST_ROWS or a.dtype != mx.float32:
        return original("logsumexp")(a, axis=axis, keepdims=keepdims, stream=stream)
    out = logsumexp_kernel()(a)
    return out if keepdims else out.squeeze(-1)
