"""Every GGUF quantisation type gguf-py dequantises, read from real files on disk.

Blocks are random codes and scales written as raw bytes (gguf-py cannot quantise K- or IQ-types), so
every code value and scale bit is exercised. Types that MLX can hold keep their codes and dequantise
(`mx.dequantize`, float32) to exactly what `gguf.quants.dequantize` gives; the rest are requantised and
stay within half a group scale of it. Tiny llama models built from such blocks give the logits torch
gives on gguf-py's dequantised weights.
"""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from mlx_lm import load

from converters.gguf_quants import mlx_quantization, to_mlx
from converters.pipeline import ensure_converted
from errors import ConversionError
from tests.exporters.gguf import as_f32, export
from tests.tiny_models import ARCHS, IDS, Q, build_model, random_blocks, torch_logits

KEPT = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q4_K: 4, Q.Q5_K: 5, Q.MXFP4: 4}
REQUANTISED = {
    Q.Q2_K: 3, Q.Q3_K: 4, Q.Q6_K: 8, Q.IQ1_S: 2, Q.IQ1_M: 2, Q.IQ2_XXS: 3, Q.IQ2_XS: 3, Q.IQ2_S: 3,
    Q.IQ3_XXS: 4, Q.IQ3_S: 4, Q.IQ4_NL: 5, Q.IQ4_XS: 5, Q.TQ1_0: 2, Q.TQ2_0: 3,
}
ROWS, COLS = 16, 512


def written_tensor(tmp_path, data: np.ndarray, raw_type):
    """`data` written as one tensor of a GGUF file, read back with gguf-py's reader."""
    path = tmp_path / f"{raw_type.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path).tensors[0]


def dequantized(parts: dict, quantization: dict) -> np.ndarray:
    if quantization["mode"] == "mxfp4":
        weights = mx.dequantize(parts["weight"], parts["scales"], group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
        return np.array(weights)
    scales, biases = (parts[k].astype(mx.float32) for k in ("scales", "biases"))
    return np.array(mx.dequantize(parts["weight"], scales, biases, group_size=32, bits=quantization["bits"]))


def bits_per_weight(qtype) -> float:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return type_size * 8 / block_size


@pytest.mark.parametrize("qtype", KEPT, ids=lambda t: t.name)
def test_kept_codes_dequantise_bit_for_bit(tmp_path, qtype):
    blocks = random_blocks(qtype, ROWS, COLS, np.random.default_rng(1))
    tensor = written_tensor(tmp_path, blocks, qtype)

    quantization = mlx_quantization(tensor)
    parts = to_mlx(tensor)

    assert quantization["bits"] == KEPT[qtype] and quantization["group_size"] == 32
    assert parts["weight"].dtype == mx.uint32 and parts["weight"].shape == (ROWS, COLS * KEPT[qtype] // 32)
    expected = gguf.quants.dequantize(blocks, qtype)
    assert np.array_equal(dequantized(parts, quantization), expected)


@pytest.mark.parametrize("qtype", REQUANTISED, ids=lambda t: t.name)
def test_requantised_within_half_a_group_scale(tmp_path, qtype):
    blocks = random_blocks(qtype, ROWS, COLS, np.random.default_rng(2))
    tensor = written_tensor(tmp_path, blocks, qtype)

    quantization = mlx_quantization(tensor)
    parts = to_mlx(tensor)

    assert quantization["bits"] == REQUANTISED[qtype] >= bits_per_weight(qtype)
    expected = gguf.quants.dequantize(blocks, qtype)
    half_scale = np.repeat(np.abs(np.array(parts["scales"].astype(mx.float32))), 32, axis=-1) / 2
    rounding = 4 * np.spacing(np.abs(expected).max())
    assert (np.abs(dequantized(parts, quantization) - expected) <= half_scale + rounding).all()


def test_bf16_bits_are_kept_as_they_are(tmp_path):
    bits = np.random.default_rng(3).integers(0, 0x7F80, size=(ROWS, COLS), dtype=np.uint16)  # finite, both signs below
    bits[::2] |= 0x8000
    tensor = written_tensor(tmp_path, bits.view(np.uint8), Q.BF16)

    weight = to_mlx(tensor)["weight"]

    assert weight.dtype == mx.bfloat16
    assert np.array_equal(np.array(weight.view(mx.uint16)), bits)


def test_type_gguf_py_cannot_dequantise_is_a_clear_error(tmp_path):
    block_size, type_size = GGML_QUANT_SIZES[Q.Q8_K]
    data = np.zeros((ROWS, COLS // block_size * type_size), dtype=np.uint8)
    tensor = written_tensor(tmp_path, data, Q.Q8_K)

    with pytest.raises(ConversionError, match="ffn_down.weight' is stored as Q8_K, which gguf-py cannot dequantise"):
        to_mlx(tensor)


def wide_llama():
    """A tiny llama whose every row holds a multiple of 256 weights, as K- and IQ-types need."""
    return build_model(ARCHS["llama"], hidden_size=256, intermediate_size=512)


def with_random_blocks(model, type_of) -> dict:
    """Set each matrix to gguf-py's dequantisation of random blocks of `type_of(name)`; returns the blocks."""
    rng = np.random.default_rng(4)
    blocks = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                qtype = type_of(name)
                blocks[name] = (random_blocks(qtype, *param.shape, rng), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks[name][0], qtype)))
    return blocks


def converted_logits(model, blocks: dict, tmp_path, store) -> tuple[np.ndarray, object]:
    source = export(model, "llama", tmp_path, store=lambda name, w: blocks.get(name) or as_f32(name, w))
    result = ensure_converted(source, store)
    converted, _ = load(str(result.path))
    converted.set_dtype(mx.float32)
    return np.array(converted(mx.array([IDS]))[0]), result


def converted_matrices(folder, model) -> dict[str, np.ndarray]:
    """Every matrix of the converted checkpoint, dequantised in float32, by torch parameter name."""
    weights = mx.load(str(folder / "model.safetensors"))
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    matrices = {}
    for name, param in model.named_parameters():
        module = name.removesuffix(".weight")
        if param.ndim == 2:
            bits = quantization.get(module, quantization)["bits"]
            parts = {k: weights[f"{module}.{k}"] for k in ("weight", "scales", "biases")}
            matrices[name] = dequantized(parts, {"bits": bits, "mode": "affine"})
    return matrices


def assert_within_half_a_group_scale(folder, model, blocks: dict) -> None:
    weights = mx.load(str(folder / "model.safetensors"))
    for name, matrix in converted_matrices(folder, model).items():
        expected = gguf.quants.dequantize(*blocks[name])
        scales = np.array(weights[name.replace(".weight", ".scales")].astype(mx.float32))
        bound = np.repeat(np.abs(scales), 32, axis=-1) / 2 + 4 * np.spacing(np.abs(expected).max())
        assert (np.abs(matrix - expected) <= bound).all(), name


def load_matrices(model, matrices: dict) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in matrices:
                param.copy_(torch.from_numpy(matrices[name]))


@pytest.mark.parametrize("qtype", KEPT, ids=lambda t: t.name)
def test_kept_types_model_matches_torch_on_gguf_weights(tmp_path, store, qtype):
    model = wide_llama()
    blocks = with_random_blocks(model, lambda name: qtype)

    logits, _ = converted_logits(model, blocks, tmp_path, store)

    assert np.abs(logits - torch_logits(model, IDS)).max() <= 1e-3


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q3_K, Q.Q2_K, Q.IQ4_XS, Q.IQ2_XXS], ids=lambda t: t.name)
def test_requantised_model_is_torch_on_weights_within_bound(tmp_path, store, qtype):
    model = wide_llama()
    blocks = with_random_blocks(model, lambda name: qtype)

    logits, result = converted_logits(model, blocks, tmp_path, store)

    assert_within_half_a_group_scale(result.path, model, blocks)
    load_matrices(model, converted_matrices(result.path, model))
    assert np.abs(logits - torch_logits(model, IDS)).max() <= 1e-3


def q4_k_m_type(name: str):
    """llama.cpp's Q4_K_M mix, in short: Q6_K for the output and some attention/FFN matrices."""
    return Q.Q6_K if name.endswith(("lm_head.weight", "v_proj.weight", "down_proj.weight")) else Q.Q4_K


def test_mixed_types_get_per_layer_overrides(tmp_path, store):
    model = wide_llama()
    blocks = with_random_blocks(model, q4_k_m_type)

    logits, result = converted_logits(model, blocks, tmp_path, store)

    quantization = json.loads((result.path / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"], quantization["mode"]) == (4, 32, "affine")
    overrides = {path: q["bits"] for path, q in quantization.items() if isinstance(q, dict)}
    assert overrides == {
        "lm_head": 8,
        **{f"model.layers.{i}.{m}": 8 for i in range(2) for m in ("self_attn.v_proj", "mlp.down_proj")},
    }
    matrices = converted_matrices(result.path, model)
    kept = [name for name, (_, qtype) in blocks.items() if qtype == Q.Q4_K]
    assert all(np.array_equal(matrices[name], gguf.quants.dequantize(*blocks[name])) for name in kept)
    assert_within_half_a_group_scale(result.path, model, blocks)
    load_matrices(model, matrices)
    assert np.abs(logits - torch_logits(model, IDS)).max() <= 1e-3


def test_unsupported_type_in_a_model_fails_before_anything_is_cached(tmp_path, store):
    model = wide_llama()
    block_size, type_size = GGML_QUANT_SIZES[Q.Q8_K]

    def q8_k_down_proj(name: str, weights: np.ndarray):
        if name.endswith("layers.1.mlp.down_proj.weight"):
            return np.zeros((weights.shape[0], weights.shape[1] // block_size * type_size), dtype=np.uint8), Q.Q8_K
        return as_f32(name, weights)

    source = export(model, "llama", tmp_path, store=q8_k_down_proj)

    with pytest.raises(ConversionError, match=r"tiny-llama\.gguf: tensor 'blk\.1\.ffn_down\.weight' is stored as Q8_K"):
        ensure_converted(source, store)
    assert store.entries() == []
