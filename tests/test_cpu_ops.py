"""Our CPU versions of mx.fast.rope, rms_norm, attention (one query, or a prompt's with NumPy's softmax),
logsumexp and mlx-lm's swiglu against MLX's own, case by case, and a small llama decoding the same
greedy tokens with them as without, alone and in a padded batch."""

from __future__ import annotations

import mlx.core as mx
import pytest

from runtime.cpu import ops as cpu_ops

TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-2, mx.bfloat16: 8e-2}


def random(shape, dtype=mx.float32, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def assert_close(ours, theirs, dtype):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = max(1.0, mx.abs(theirs.astype(mx.float32)).max().item())
    assert mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max().item() <= TOLERANCE[dtype] * scale


FREQS = mx.array([1.0, 3.0, 10.0, 40.0, 90.0, 300.0, 1000.0, 5000.0])

ROPE_CASES = [  # shape, dims, traditional, base, scale, offset, freqs, dtype: one position, as in decoding
    ((2, 3, 1, 16), 16, False, 10000.0, 1.0, 0, None, mx.float32),
    ((1, 4, 1, 16), 16, False, 10000.0, 1.0, 41, None, mx.float32),
    ((2, 3, 1, 16), 16, True, 500000.0, 1.0, 7, None, mx.float32),
    ((2, 3, 1, 32), 16, False, 10000.0, 0.25, 9, None, mx.float32),  # partial rotary
    ((2, 2, 1, 24), 16, True, 10000.0, 1.0, 3, None, mx.float32),
    ((3, 2, 1, 16), 16, False, 10000.0, 1.0, mx.array([5, 0, 12]), None, mx.float32),  # one offset a row
    ((3, 2, 1, 16), 16, True, 10000.0, 1.0, mx.array([2, 9, 0]), None, mx.float32),
    ((2, 2, 1, 16), 16, False, 10000.0, 1.0, mx.array(6), None, mx.float32),
    ((2, 1, 16), 16, False, 10000.0, 1.0, 4, None, mx.float32),  # (B, T, D)
    ((2, 3, 1, 16), 16, False, None, 1.0, 11, FREQS, mx.float32),  # given frequencies, as Llama 3's
    ((2, 3, 1, 16), 16, False, 10000.0, 1.0, 30, None, mx.float16),
    ((2, 3, 1, 16), 16, True, 10000.0, 1.0, 30, None, mx.bfloat16),
    ((2, 3, 5, 16), 16, True, 10000.0, 1.0, mx.array([2, 9]), None, mx.float32),  # a prompt: MLX's own
]


@pytest.mark.parametrize("shape, dims, traditional, base, scale, offset, freqs, dtype", ROPE_CASES)
def test_rope_matches_mlx(shape, dims, traditional, base, scale, offset, freqs, dtype):
    x = random(shape, dtype)
    options = dict(traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)
    assert_close(cpu_ops.rope(x, dims, **options), cpu_ops.original("rope")(x, dims, **options), dtype)


@pytest.mark.parametrize("shape, weighted, eps, dtype", [
    ((2, 5, 16), True, 1e-5, mx.float32), ((1, 1, 64), True, 1e-6, mx.float32),
    ((3, 8), False, 1e-5, mx.float32), ((2, 4, 32), True, 1e-5, mx.float16), ((2, 4, 32), True, 1e-5, mx.bfloat16),
])
def test_rms_norm_matches_mlx(shape, weighted, eps, dtype):
    x, weight = random(shape, dtype), (random(shape[-1:], dtype, seed=1) if weighted else None)
    assert_close(cpu_ops.rms_norm(x, weight, eps), cpu_ops.original("rms_norm")(x, weight, eps), dtype)


def bool_mask(batch, keys):
    """Left padding: row b cannot see its first b keys."""
    return (mx.arange(keys)[None, :] >= mx.arange(batch)[:, None]).reshape(batch, 1, 1, keys)


ATTENTION_CASES = [  # batch, query heads, key/value heads, queries, keys, mask, dtype
    (1, 9, 3, 1, 17, None, mx.float32),
    (2, 4, 4, 1, 5, "causal", mx.float32),
    (3, 6, 2, 1, 8, "bool", mx.float32),
    (2, 4, 2, 1, 6, "additive", mx.float32),
    (1, 2, 1, 1, 1, None, mx.float32),
    (2, 6, 3, 1, 9, "bool", mx.float16),
    (2, 4, 2, 3, 7, "causal", mx.float32),  # several queries, few scores: MLX's own
    (2, 6, 2, 1, 1500, "bool", mx.float32),  # a long context: our softmax
    (1, 4, 2, 1, 1030, "additive", mx.float16),
    (2, 6, 2, 40, 300, "causal", mx.float32),  # a prompt's queries: NumPy's softmax
    (2, 6, 2, 40, 300, "bool", mx.float32),
    (2, 4, 2, 40, 256, "hidden row", mx.float32),  # a query that sees no key: even weights, as MLX's
    (1, 4, 4, 64, 300, "additive", mx.float32),
    (1, 6, 3, 48, 256, "additive 2-D", mx.float32),
    (1, 4, 2, 40, 500, "causal", mx.float16),  # MLX's own
]


def attention_mask(kind, batch, heads, queries, keys, dtype):
    if kind == "bool":
        return bool_mask(batch, keys)
    if kind == "hidden row":
        mask = mx.broadcast_to(bool_mask(batch, keys), (batch, 1, queries, keys))
        return mx.concatenate([mx.zeros((batch, 1, 1, keys), mx.bool_), mask[:, :, 1:]], axis=2)
    if kind == "additive":
        return random((batch, heads, queries, keys), dtype, seed=5)
    if kind == "additive 2-D":
        return random((queries, keys), dtype, seed=5)
    return kind


@pytest.mark.parametrize("batch, heads, groups, queries, keys, kind, dtype", ATTENTION_CASES)
def test_attention_matches_mlx(batch, heads, groups, queries, keys, kind, dtype):
    q, k, v = (random(shape, dtype, seed) for seed, shape in
               enumerate([(batch, heads, queries, 16), (batch, groups, keys, 16), (batch, groups, keys, 16)]))
    mask = attention_mask(kind, batch, heads, queries, keys, dtype)
    ours = cpu_ops.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    theirs = cpu_ops.original("scaled_dot_product_attention")(q, k, v, scale=0.25, mask=mask)
    assert_close(ours, theirs, dtype)


def test_exp_matches_mlx_across_the_float_range():
    x = mx.concatenate([mx.linspace(-100.0, 88.0, 20001), mx.array([-mx.inf, mx.inf, 89.0, -87.0, 0.0])])
    ours, theirs = cpu_ops.exp(x), mx.exp(x)
    assert mx.all(mx.isinf(ours) == mx.isinf(theirs)).item()
    finite = mx.isfinite(theirs) & (theirs > 1e-37)
    relative = mx.abs(ours - theirs) / mx.where(finite, theirs, 1.0)
    assert mx.where(finite, relative, 0.0).max().item() < 1e-6
    assert mx.where(theirs <= 1e-37, mx.abs(ours - theirs), 0.0).max().item() < 2e-37  # flushed to zero at most


def logits(shape, dtype=mx.float32):
    x = random(shape, dtype) * 12.0
    if shape[0] > 2:  # a row a sampler masked entirely, and one with a single token left
        x[1] = -mx.inf
        x[2, 1:] = -mx.inf
    return x


@pytest.mark.parametrize("shape, axis, keepdims, dtype", [
    ((1, 97), -1, True, mx.float32), ((4, 49152), -1, True, mx.float32), ((3, 50), 1, False, mx.float32),
    ((3, 50), 0, False, mx.float32), ((2, 3, 8), -1, False, mx.float32), ((3, 50), None, False, mx.float32),
    ((3, 50), -1, True, mx.float16),  # the last four: MLX's own
])
def test_logsumexp_matches_mlx(shape, axis, keepdims, dtype):
    x = logits(shape, dtype)
    ours = cpu_ops.logsumexp(x, axis=axis, keepdims=keepdims)
    theirs = cpu_ops.original("logsumexp")(x, axis=axis, keepdims=keepdims)
    assert mx.all(mx.isinf(ours) == mx.isinf(theirs)).item()
    assert_close(mx.where(mx.isinf(theirs), 0.0, ours), mx.where(mx.isinf(theirs), 0.0, theirs), dtype)


@pytest.mark.parametrize("shape, dtype", [((1, 1, 64), mx.float32), ((4, 1, 1536), mx.float32),
                                          ((2, 5, 64), mx.float32), ((1, 330, 96), mx.float32),
                                          ((20, 1, 64), mx.float32), ((4, 1, 64), mx.float16)])
def test_swiglu_matches_mlx_lm(shape, dtype):
    gate, x = random(shape, dtype) * 30.0, random(shape, dtype, seed=1)
    assert_close(cpu_ops.swiglu(gate, x), cpu_ops.original("swiglu")(gate, x), dtype)


@pytest.mark.parametrize("keys", [100, cpu_ops.LONG_CONTEXT, 5000])
def test_softmax_matches_mlx_short_and_long(keys):
    scores = random((2, 3, 2, keys)) * 8.0
    scores[0, 0, 0, : keys // 2] = -mx.inf  # masked keys
    scores[1, 1, 1] = mx.finfo(mx.float32).min  # a row masked entirely, as a boolean mask leaves it
    assert_close(cpu_ops.softmax(scores), mx.softmax(scores, axis=-1, precise=True), mx.float32)


@pytest.fixture
def swapped():
    names = cpu_ops.install()
    yield names
    cpu_ops.uninstall()


def test_install_swaps_the_ops_on_the_cpu_and_uninstall_restores_mlx(swapped):
    from mlx_lm.models import activations, llama

    assert swapped == list(cpu_ops.REPLACED)  # the suite runs MLX on the CPU
    assert mx.fast.rope is cpu_ops.rope and mx.fast.rms_norm is cpu_ops.rms_norm and mx.logsumexp is cpu_ops.logsumexp
    assert llama.swiglu is cpu_ops.swiglu and activations.swiglu is cpu_ops.swiglu
    cpu_ops.uninstall()
    assert mx.fast.rope is not cpu_ops.rope and mx.logsumexp is not cpu_ops.logsumexp and cpu_ops.installed() == []
    assert llama.swiglu is not cpu_ops.swiglu and activations.swiglu is not cpu_ops.swiglu
    assert cpu_ops.install() == swapped


def tiny_llama():
    from mlx_lm.models import llama

    mx.random.seed(3)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def greedy_batch(model, prompts, steps=12):
    """Greedy tokens of each prompt, decoded together (left-padded, one offset per row)."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=len(prompts))
    uids = generator.insert(prompts, max_tokens=[steps] * len(prompts))
    tokens, running = {uid: [] for uid in uids}, set(uids)
    while running:  # the first calls prefill, and answer nothing
        for response in generator.next()[1]:
            tokens[response.uid].append(response.token)
            if response.finish_reason is not None:
                running.discard(response.uid)
    generator.close()
    return [tokens[uid] for uid in uids]


def test_a_small_llama_decodes_the_same_greedy_tokens_with_our_ops():
    long = [(7 * i) % 90 + 3 for i in range(150)]  # enough scores for the prompt attention
    model, prompts = tiny_llama(), [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], long]
    theirs = greedy_batch(model, prompts) + greedy_batch(model, prompts[:1]) + greedy_batch(model, [long])
    cpu_ops.install()
    try:
        ours = greedy_batch(model, prompts) + greedy_batch(model, prompts[:1]) + greedy_batch(model, [long])
    finally:
        cpu_ops.uninstall()
    assert ours == theirs and len(ours[0]) == 12


def test_a_small_llama_gives_the_same_logits_at_every_position_of_a_prompt_with_our_ops():
    model, prompt = tiny_llama(), mx.array([[(7 * i) % 90 + 3 for i in range(150)]])
    theirs = model(prompt)
    cpu_ops.install()
    try:
        ours = model(prompt)
    finally:
        cpu_ops.uninstall()
    assert_close(ours, theirs, mx.float32)
