"""The softmax of attention over a prompt's positions on the CPU, in NumPy (`ops` does the products).

Once a prompt is a few thousand tokens long, prefilling it is mostly attention's softmax: MLX's x86
CPU wheel computes exponentials one element at a time (about 11 ns each), and a 512-token chunk at
4,096 positions has 19 million scores in each of SmolLM2's 30 layers (207 ms a layer, 6.2 s of the
chunk's 6.9). NumPy's vectorised float32 `exp` gives the same softmax, conversions included, in about
62 ms. The scores are evaluated where the softmax needs them, which costs a prefill nothing: its
chunk is evaluated as a whole right after anyway.

Masks behave as in MLX's own fallback: hidden scores become float32's lowest value (a row with every
key hidden attends to all of them evenly), and an additive mask is added.
"""

from __future__ import annotations

LEAST_SCORES = 1 << 16  # fewer, and the wait for the scores outweighs what NumPy saves


def covers(q, k, v, mask, sinks) -> bool:
    """Several queries in float32, whole groups of query heads, a mask this module can shape, and enough
    scores for NumPy's speed to outweigh the copies."""
    import mlx.core as mx

    shaped = q.ndim == 4 and k.ndim == 4 and q.shape[2] > 1 and q.shape[1] % k.shape[1] == 0
    plain_mask = mask is None or (isinstance(mask, str) and mask == "causal") or (
        isinstance(mask, mx.array) and mask.ndim in (2, 4))
    floats = q.dtype == k.dtype == v.dtype == mx.float32
    many = shaped and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] >= LEAST_SCORES
    return sinks is None and plain_mask and floats and many


def softmax(scores, mask, repeats: int, length: int):
    """The softmax of (batch, groups, repeats * length, keys) scores over the keys, each group's `repeats`
    query heads stacked with their `length` queries, in NumPy."""
    import mlx.core as mx
    import numpy as np

    mx.eval(scores)
    s = np.array(scores)  # a writable copy: everything below works in place
    hide(s.reshape(*s.shape[:2], repeats, length, s.shape[-1]), mask)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return mx.array(s)


def hide(scores, mask) -> None:
    """Apply `mask` in place to (batch, groups, repeats, length, keys) scores."""
    import numpy as np

    if mask is None:
        return
    if isinstance(mask, str):  # "causal": the queries are the last `length` of the positions
        length, keys = scores.shape[-2:]
        hidden = np.arange(keys)[None, :] > np.arange(keys - length, keys)[:, None]
        scores[..., hidden] = np.finfo(np.float32).min
        return
    given = grouped(np.array(mask), scores.shape[1], scores.shape[2])
    if given.dtype == np.bool_:
        np.copyto(scores, np.finfo(np.float32).min, where=~given)
    else:
        scores += given


def grouped(mask, groups: int, repeats: int):
    """A (length, keys) or (batch, heads or 1, length, keys) mask, shaped to broadcast over
    (batch, groups, repeats, length, keys)."""
    if mask.ndim == 2:
        return mask
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], groups, repeats, *mask.shape[2:])
