"""GGUF files written with gguf.GGUFWriter from tiny torch models convert to MLX with the same logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load

from converters.pipeline import ensure_converted
from tests.tiny_models import ARCHS, Q, build_model, reference_logits, write_gguf

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
IDS = [1, 40, 77, 200, 259, 3, 150, 261, 18, 99, 2, 64]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch_name", sorted(ARCHS))
def test_converted_logits_match_torch(tmp_path, store, arch_name, qtype):
    arch = ARCHS[arch_name]
    torch_model = build_model(arch)
    source = write_gguf(torch_model, arch, tmp_path / f"tiny-{arch_name}-{qtype.name}.gguf", qtype)

    result = ensure_converted(source, store)
    model, _ = load(str(result.path))
    model.set_dtype(mx.float32)  # compare the stored weights, not float16 arithmetic
    logits = np.array(model(mx.array([IDS]))[0])

    expected = reference_logits(torch_model, qtype, IDS)
    assert np.abs(logits - expected).max() <= 1e-3


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_quantised_tensors_are_kept_not_requantised(tmp_path, store, qtype):
    arch = ARCHS["llama"]
    source = write_gguf(build_model(arch), arch, tmp_path / "tiny.gguf", qtype)

    result = ensure_converted(source, store)
    config = json.loads((result.path / "config.json").read_text())
    weights = mx.load(str(result.path / "model.safetensors"))

    bits = 8 if qtype == Q.Q8_0 else 4
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
    q_proj = "model.layers.0.self_attn.q_proj"
    assert weights[f"{q_proj}.weight"].dtype == mx.uint32
    assert weights[f"{q_proj}.weight"].shape == (64, 64 * bits // 32)
    assert weights[f"{q_proj}.scales"].shape == (64, 2)


def test_config_comes_from_metadata_and_shapes(tmp_path, store):
    arch = ARCHS["qwen2"]
    torch_model = build_model(arch)
    source = write_gguf(torch_model, arch, tmp_path / "tiny.gguf", Q.F32)

    config = json.loads((ensure_converted(source, store).path / "config.json").read_text())

    reference = torch_model.config
    assert config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is True
    assert config["head_dim"] == reference.hidden_size // reference.num_attention_heads
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["vocab_size"] == reference.vocab_size
    assert config["max_position_embeddings"] == 512
    assert config["eos_token_id"] == [2]


def test_bf16_stays_bf16_beyond_float16_range(tmp_path, store):
    arch = ARCHS["llama"]
    torch_model = build_model(arch)
    with torch.no_grad():
        torch_model.model.embed_tokens.weight[5, 3] = 1.0e5  # float16 tops out at 65504
    source = write_gguf(torch_model, arch, tmp_path / "tiny-bf16.gguf", Q.BF16)

    weights = mx.load(str(ensure_converted(source, store).path / "model.safetensors"))

    embedding = weights["model.embed_tokens.weight"]
    assert embedding.dtype == mx.bfloat16
    assert abs(embedding[5, 3].item() - 1.0e5) / 1.0e5 < 1e-2
