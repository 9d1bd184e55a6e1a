"""GGUF architectures: llama.cpp's tensor names, norm convention and q/k row layout, mapped back onto
the mlx-lm module that runs each one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from errors import ConversionError, UnsupportedArchitectureError

# Where rope's rotation pairs sit in a head's rows: adjacent rows (llama.cpp's LLAMA_ROPE_TYPE_NORM,
# MLX's `traditional=True`) or a row and the one half a head further (NEOX, HF, MLX's default).
INTERLEAVED = "interleaved"
HALVES = "halves"

LLAMA_BLOCK = {
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
PHI3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",  # llama.cpp keeps Phi-3's fused gate and up rows, gate first
    "ffn_down": "mlp.down_proj",
}
GEMMA_BLOCK = {
    **LLAMA_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors whose content goes into the config instead: rope scaling (Llama 3.1+, Phi-3 long context).
CONFIG_TENSORS = {"rope_freqs", "rope_factors_long", "rope_factors_short"}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    # The q/k row layout llama.cpp's converter writes: it permutes rows only for architectures whose
    # rope llama.cpp runs on adjacent pairs.
    rope_layout: str
    block_tensors: dict = field(default_factory=lambda: LLAMA_BLOCK)
    # llama.cpp stores Gemma's RMSNorm weights as 1 + w; mlx-lm's Gemma modules add the 1 themselves.
    norm_offset: float = 0.0


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", INTERLEAVED),
    "mistral": Architecture("llama", "LlamaForCausalLM", INTERLEAVED),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", HALVES),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", HALVES),
    "phi3": Architecture("phi3", "Phi3ForCausalLM", HALVES, PHI3_BLOCK),
    "gemma2": Architecture("gemma2", "Gemma2ForCausalLM", HALVES, GEMMA_BLOCK, norm_offset=1.0),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", HALVES, GEMMA_BLOCK, norm_offset=1.0),
}

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)$")


def architecture_for(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{name}' is not supported yet (supported: {supported})"
        )
    return ARCHITECTURES[name]


def hf_module_path(gguf_module: str, arch: Architecture) -> str:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`."""
    if gguf_module in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_module]
    match = _BLOCK_NAME.match(gguf_module)
    if match and match.group(2) in arch.block_tensors:
        return f"model.layers.{match.group(1)}.{arch.block_tensors[match.group(2)]}"
    raise ConversionError(
        f"tensor '{gguf_module}' has no known place in a {arch.model_type} model; this GGUF variant is not supported yet"
    )


def is_norm(hf_module: str) -> bool:
    return hf_module.endswith("norm")


def target_rope_layout(config: dict) -> str:
    """The q/k row layout the mlx-lm module built from `config` expects, read off its rope modules."""
    from mlx_lm.utils import _get_classes  # the lookup mlx_lm.load itself uses

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))  # parameters stay lazy: nothing is allocated
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # what mlx-lm raises on a config it cannot use
        raise ConversionError(
            f"mlx-lm cannot build a '{config['model_type']}' model from this file's metadata ({exc})"
        ) from exc
    ropes = [module for _, module in model.named_modules() if type(module).__name__.endswith("RoPE")]
    # mlx-lm's rope classes without the flag (e.g. SuScaledRoPE) always rotate halves.
    layouts = {INTERLEAVED if getattr(rope, "traditional", False) else HALVES for rope in ropes}
    if len(layouts) != 1:
        raise ConversionError(
            f"cannot tell the rope layout of mlx-lm's '{config['model_type']}' module (found {sorted(layouts)})"
        )
    return layouts.pop()


def qk_heads(hf_module: str, config: dict) -> int | None:
    """How many heads a q/k projection's rows are grouped into, or None for other tensors."""
    if hf_module.endswith("self_attn.q_proj"):
        return config["num_attention_heads"]
    if hf_module.endswith("self_attn.k_proj"):
        return config["num_key_value_heads"]
    return None


def interleaved_to_halves(rows, n_head: int):
    """Undo llama.cpp's q/k `permute` on the leading (row) axis; works on codes, scales and biases alike."""
    shape = rows.shape
    grouped = rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])
    return grouped.swapaxes(1, 2).reshape(shape)


def halves_to_interleaved(rows, n_head: int):
    shape = rows.shape
    grouped = rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
    return grouped.swapaxes(1, 2).reshape(shape)


def row_reordering(source_layout: str, target_layout: str):
    """The q/k row permutation taking the GGUF's layout to the target module's, or None."""
    if source_layout == target_layout:
        return None
    return interleaved_to_halves if source_layout == INTERLEAVED else halves_to_interleaved
