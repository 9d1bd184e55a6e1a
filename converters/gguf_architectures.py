"""GGUF architectures: how llama.cpp's names and layouts map back onto the mlx-lm model modules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from converters.errors import ConversionError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    # llama.cpp's converter permutes q/k rows for interleaved rope; mlx-lm's module expects HF order.
    permuted_qk: bool
    extra_config: dict = field(default_factory=dict)


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "mistral": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", permuted_qk=False),
}

GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)$")


def architecture_for(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{name}' is not supported yet (supported: {supported})"
        )
    return ARCHITECTURES[name]


def hf_module_path(gguf_module: str) -> str:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`."""
    if gguf_module in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_module]
    match = _BLOCK_NAME.match(gguf_module)
    if match and match.group(2) in BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{BLOCK_TENSORS[match.group(2)]}"
    raise ConversionError(f"tensor '{gguf_module}' has no known place in the model; this GGUF variant is not supported yet")


def qk_heads(hf_module: str, config: dict) -> int | None:
    """How many heads a q/k projection's rows are grouped into, or None for other tensors."""
    if hf_module.endswith("self_attn.q_proj"):
        return config["num_attention_heads"]
    if hf_module.endswith("self_attn.k_proj"):
        return config["num_key_value_heads"]
    return None


def unpermute_rows(rows, n_head: int):
    """Undo llama.cpp's `permute` on the leading (row) axis; works for packed codes, scales and biases."""
    shape = rows.shape
    grouped = rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
    return grouped.swapaxes(1, 2).reshape(shape)
