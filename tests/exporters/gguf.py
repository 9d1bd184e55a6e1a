"""GGUF written with `gguf.GGUFWriter` the way llama.cpp's convert_hf_to_gguf writes each architecture:
its metadata keys, tensor names from gguf-py's own name map, q/k rows permuted for llama's
interleaved rope, Gemma norms stored as 1 + w, lm_head left out when tied (save_pretrained never
writes it), and every tensor F32 unless a `store` says otherwise.

Beyond llama.cpp's converter: Gemma's query_pre_attn_scalar and Gemma 3's local rope base and
sliding-window pattern are written under gguf-py's standard keys (`attention.scale`,
`rope.freq_base_swa`, `attention.sliding_window_pattern`). llama.cpp leaves them to hard-coded
defaults (head_dim, 10000, every 6th layer global), which the tiny models deliberately differ from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from tests.tiny_models import CHATML, MERGES, SPECIAL_TOKENS, llama_cpp_permute, vocabulary, write_shape

Q = gguf.GGMLQuantizationType
A = gguf.MODEL_ARCH
# (HF name, HF-layout weights) -> (data for GGUFWriter.add_tensor, its raw type)
Store = Callable[[str, np.ndarray], tuple[np.ndarray, Q]]


def as_f32(name: str, weights: np.ndarray) -> tuple[np.ndarray, Q]:
    return weights.astype(np.float32), Q.F32


def rope(config) -> dict:
    parameters = config.rope_parameters
    return parameters.get("full_attention", parameters)


def no_extra(writer: gguf.GGUFWriter, config) -> None:
    pass


def phi3_metadata(writer: gguf.GGUFWriter, config) -> None:
    writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    rotated = int(rope(config).get("partial_rotary_factor", 1.0) * config.hidden_size)
    writer.add_rope_dimension_count(rotated // config.num_attention_heads)
    writer.add_sliding_window(config.sliding_window or 0)


def gemma2_metadata(writer: gguf.GGUFWriter, config) -> None:
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def gemma3_metadata(writer: gguf.GGUFWriter, config) -> None:
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def gemma_attention_scale(writer: gguf.GGUFWriter, config) -> None:
    writer.add_attention_scale(1.0 / math.sqrt(config.query_pre_attn_scalar))


def gemma3_local_attention(writer: gguf.GGUFWriter, config) -> None:
    gemma_attention_scale(writer, config)
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])


@dataclass(frozen=True)
class Spec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's LlamaModel permutes q/k rows for its interleaved rope
    norm_shift: float = 0.0  # llama.cpp's Gemma converters add 1 to every *norm.weight
    metadata: Callable = field(default=no_extra)
    # Keys llama.cpp's converter does not write (see the module docstring).
    beyond_llama_cpp: Callable = field(default=no_extra)


SPECS = {
    "llama": Spec(A.LLAMA, permute_qk=True),
    "mistral": Spec(A.LLAMA, permute_qk=True),  # llama.cpp converts MistralForCausalLM as LLAMA
    "qwen2": Spec(A.QWEN2),
    "qwen3": Spec(A.QWEN3),
    "phi3": Spec(A.PHI3, metadata=phi3_metadata),
    "gemma2": Spec(A.GEMMA2, norm_shift=1.0, metadata=gemma2_metadata, beyond_llama_cpp=gemma_attention_scale),
    "gemma3": Spec(A.GEMMA3, norm_shift=1.0, metadata=gemma3_metadata, beyond_llama_cpp=gemma3_local_attention),
}


def export(model, arch: str, dest: Path, store: Store = as_f32, tokenizer: Callable | None = None,
           llama_cpp_keys_only: bool = False) -> Path:
    spec = SPECS[arch]
    path = dest / f"tiny-{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[spec.arch])
    write_hyperparameters(writer, model.config)
    spec.metadata(writer, model.config)
    if not llama_cpp_keys_only:
        spec.beyond_llama_cpp(writer, model.config)
    (tokenizer or write_bpe_tokenizer)(writer)
    if spec.arch == A.LLAMA and rope(model.config).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_divisors(model.config))
    for name, data, raw in gguf_tensors(model, spec, store):
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    write_shape(writer, config, rope(config)["rope_theta"])
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def llama3_rope_divisors(config) -> np.ndarray:
    """What llama.cpp's LlamaModel writes as `rope_freqs` for Llama 3 rope scaling."""
    params = rope(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    old, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    divisors = []
    for frequency in 1.0 / params["rope_theta"] ** (np.arange(0, dim, 2) / dim):
        wavelength = 2 * math.pi / frequency
        if wavelength < old / high:
            divisors.append(1.0)
        elif wavelength > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def write_bpe_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The tiny byte-level BPE vocabulary, as llama.cpp's `_set_vocab_gpt2` writes one."""
    tokens = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)


GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# A sentencepiece-BPE vocabulary in merge order, each piece built from two earlier ones.
GEMMA_PIECES = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "llo", "hello", "\u2581hello",
                "or", "ld", "orld", "world", "\u2581world"]
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_vocabulary(size: int) -> list[str]:
    tokens = GEMMA_CONTROL + GEMMA_PIECES
    return tokens + [f"<unused{i}>" for i in range(size - len(tokens))]


def sentencepiece_type(token: str) -> gguf.TokenType:
    if token == "<unk>":
        return gguf.TokenType.UNKNOWN
    if token in GEMMA_CONTROL:
        return gguf.TokenType.CONTROL
    return gguf.TokenType.UNUSED if token.startswith("<unused") else gguf.TokenType.NORMAL


def write_sentencepiece_tokenizer(writer: gguf.GGUFWriter, size: int = len(vocabulary())) -> None:
    """A tiny Gemma-style vocabulary, as llama.cpp's `_set_vocab_sentencepiece` writes one."""
    tokens = gemma_vocabulary(size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([sentencepiece_type(token) for token in tokens])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(GEMMA_CHAT)


def gguf_tensors(model, spec: Spec, store: Store):
    """(GGUF name, data, raw type) for every tensor llama.cpp's converter would write."""
    config = model.config
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights = tensor.detach().float().numpy()
        if spec.norm_shift and hf_name.endswith("norm.weight"):
            weights = weights + np.float32(spec.norm_shift)
        data, raw = store(hf_name, weights)
        heads = qk_heads(hf_name, config) if spec.permute_qk else None
        if heads:  # row order commutes with row-wise quantisation, so raw blocks permute alike
            data = llama_cpp_permute(data, heads)
        yield names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data, raw


def qk_heads(hf_name: str, config) -> int | None:
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return config.num_key_value_heads
    return None
