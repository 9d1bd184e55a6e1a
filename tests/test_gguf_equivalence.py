"""GGUF files written with gguf.GGUFWriter from tiny torch models convert to MLX with the same logits;
the seven architectures' configs, norms, rope layouts and tokenizers come back as llama.cpp wrote them."""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx_lm import load
from mlx_lm.utils import load_tokenizer

from converters import gguf_format
from converters.gguf_architectures import HALVES, INTERLEAVED, row_reordering, target_rope_layout
from converters.pipeline import ensure_converted
from errors import ConversionError
from tests.exporters.gguf import export as gguf_export
from tests.exporters.gguf import write_sentencepiece_tokenizer
from tests.tiny_models import (
    ARCHS,
    HF_ARCH_NAMES,
    IDS,
    Q,
    build_hf_model,
    build_model,
    llama_cpp_permute,
    reference_logits,
    stored,
    torch_logits,
    write_gguf,
)

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


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


# ---- the seven architectures, written the way llama.cpp's converter writes them ----

KEPT_TYPES = [Q.Q8_0, Q.Q5_0, Q.Q4_1]


@pytest.mark.parametrize("qtype", KEPT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", HF_ARCH_NAMES)
def test_quantised_architectures_match_torch_on_gguf_weights(tmp_path, store, arch, qtype):
    model = build_hf_model(arch)
    source = gguf_export(model, arch, tmp_path, store=lambda name, weights: stored(weights, qtype))

    converted, _ = load(str(ensure_converted(source, store).path))
    converted.set_dtype(mx.float32)
    logits = np.array(converted(mx.array([IDS]))[0])

    assert np.abs(logits - reference_logits(model, qtype, IDS)).max() <= 1e-3


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_sentencepiece_vocabulary(tmp_path, store, arch):
    source = gguf_export(build_hf_model(arch), arch, tmp_path, tokenizer=write_sentencepiece_tokenizer)

    tokenizer = load_tokenizer(ensure_converted(source, store).path)

    ids = tokenizer.encode("hello world")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "hello", "\u2581world"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert tokenizer.decode(tokenizer.encode("hello  world hello"), skip_special_tokens=True) == "hello  world hello"
    assert tokenizer.eos_token_ids == {1}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"


def test_qk_rows_follow_the_target_modules_rope_layout(tmp_path, store):
    source = gguf_export(build_hf_model("llama"), "llama", tmp_path)
    config = json.loads((ensure_converted(source, store).path / "config.json").read_text())
    rows = np.arange(64 * 3).reshape(64, 3)

    assert target_rope_layout(config) == HALVES
    assert target_rope_layout({**config, "rope_traditional": True}) == INTERLEAVED
    assert row_reordering(INTERLEAVED, INTERLEAVED) is None and row_reordering(HALVES, HALVES) is None
    assert np.array_equal(row_reordering(INTERLEAVED, HALVES)(llama_cpp_permute(rows, 4), 4), rows)
    assert np.array_equal(row_reordering(HALVES, INTERLEAVED)(rows, 4), llama_cpp_permute(rows, 4))


def test_gemma3_without_the_extra_keys_gets_llama_cpps_defaults(tmp_path):
    source = gguf_export(build_hf_model("gemma3"), "gemma3", tmp_path, llama_cpp_keys_only=True)

    config = gguf_format.read(source).config

    assert config["query_pre_attn_scalar"] == config["head_dim"] == 16
    assert (config["rope_local_base_freq"], config["sliding_window_pattern"], config["sliding_window"]) == (10000.0, 6, 8)
    assert (config["rope_theta"], config["model_type"]) == (1234.0, "gemma3_text")


def gemma_header(tmp_path, arch: str, layers: int, pattern=None):
    """A Gemma GGUF with hidden 64, 4 heads of 32 (so hidden / heads = 16), and one tensor."""
    path = tmp_path / f"{arch}-{layers}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in [("add_embedding_length", 64), ("add_block_count", layers), ("add_feed_forward_length", 128),
                       ("add_head_count", 4), ("add_head_count_kv", 2), ("add_key_length", 32), ("add_sliding_window", 8)]:
        getattr(writer, add)(value)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    writer.add_tensor("token_embd.weight", np.zeros((262, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "arch, layers, scalar", [("gemma2", 46, 16), ("gemma2", 26, 32), ("gemma3", 62, 16), ("gemma3", 34, 32)]
)
def test_gemma_attention_scale_follows_llama_cpps_rule(tmp_path, arch, layers, scalar):
    config = gguf_format.read(gemma_header(tmp_path, arch, layers)).config

    assert config["query_pre_attn_scalar"] == scalar  # hidden / heads for the 27B variants, else head_dim


def test_gemma3_sliding_pattern_from_per_layer_flags(tmp_path):
    assert gguf_format.read(gemma_header(tmp_path, "gemma3", 6, [True, True, False] * 2)).config["sliding_window_pattern"] == 3
    with pytest.raises(ConversionError, match="do not repeat with one period"):
        gguf_format.read(gemma_header(tmp_path, "gemma3", 4, [True, False, False, True]))


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_scaled_model():
    """A tiny llama with Llama 3.1's rope scaling; head_dim 64 reaches its scaled and smoothed bands."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=262, max_position_embeddings=512, rope_parameters=LLAMA3_ROPE,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, store):
    model = llama3_scaled_model()
    ids = [i % 262 for i in range(0, 4000, 9)]  # 445 positions: low frequencies turn far enough to matter
    source = gguf_export(model, "llama", tmp_path)

    result = ensure_converted(source, store)
    converted, _ = load(str(result.path))
    converted.set_dtype(mx.float32)
    logits = np.array(converted(mx.array([ids]))[0])

    config = json.loads((result.path / "config.json").read_text())
    assert config["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert np.abs(logits - torch_logits(model, ids)).max() <= 1e-3
