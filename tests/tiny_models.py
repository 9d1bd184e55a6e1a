"""Tiny random models built in-process with transformers + torch, and their GGUF exports.

The GGUF writer here mirrors llama.cpp's convert_hf_to_gguf: llama's q/k rows are permuted for
interleaved rope, 2-D weights are quantised with gguf-py, norms stay F32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class TinyArch:
    name: str
    config_class: type
    model_class: type
    permuted_qk: bool
    pre_tokenizer: str
    tied: bool


ARCHS = {
    "llama": TinyArch("llama", LlamaConfig, LlamaForCausalLM, True, "smollm", tied=False),
    "qwen2": TinyArch("qwen2", Qwen2Config, Qwen2ForCausalLM, False, "qwen2", tied=True),
}

GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def vocabulary() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIAL_TOKENS + list(bytes_to_unicode().values()) + merged


def build_model(arch: TinyArch, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 128, context: int = 512):
    torch.manual_seed(seed)
    config = arch.config_class(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(vocabulary()), max_position_embeddings=context,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=arch.tied,
        bos_token_id=1, eos_token_id=2,
    )
    return randomised(arch.model_class(config).eval())


def randomised(model):
    """Weights far from transformers' init, so that a wrong mapping shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    return model


def gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"blk.{index}.{GGUF_NAMES[rest]}.{kind}"
    return f"{GGUF_NAMES[module]}.{kind}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def stored(weights: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """What llama.cpp would store for a tensor in a file of type `qtype`: (data, raw type)."""
    if weights.ndim == 1 or qtype == Q.F32:
        return weights.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return weights.astype(np.float16), Q.F16
    return gguf.quants.quantize(weights.astype(np.float32), qtype), qtype


def round_trip(weights: np.ndarray, qtype) -> np.ndarray:
    """The values a reader gets back for `weights` stored as `qtype` (row-wise, so row order is irrelevant)."""
    data, raw = stored(weights, qtype)
    return gguf.quants.dequantize(data, raw).reshape(weights.shape).astype(np.float32)


def write_gguf(model, arch: TinyArch, path: Path, qtype, split_max_tensors: int = 0) -> Path:
    """The model as llama.cpp would store it; with `split_max_tensors`, in gguf-py's split parts
    (`path`'s stem + -0000k-of-0000N.gguf), and the first part's path is returned."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch.name, split_max_tensors=split_max_tensors)
    write_metadata(writer, config, arch)
    for hf_name, tensor in model.state_dict().items():
        weights = tensor.detach().numpy()
        if arch.permuted_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            weights = llama_cpp_permute(weights, heads)
        if arch.tied and hf_name == "lm_head.weight":
            continue
        data, raw = stored(weights, qtype)
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return parts[0] if split_max_tensors and parts else path


def write_shape(writer: gguf.GGUFWriter, config, rope_theta: float) -> None:
    """The hyperparameters every llama-like GGUF states, as llama.cpp's converter writes them."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_metadata(writer: gguf.GGUFWriter, config, arch: TinyArch) -> None:
    write_shape(writer, config, 10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(arch.pre_tokenizer)
    tokens = vocabulary()
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)


# Where each type keeps its float16 block scales (d, dmin, m), as byte offsets in a block.
F16_SCALE_OFFSETS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.TQ1_0: (52,), Q.TQ2_0: (64,),
}


def random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator, spread: float = 0.15) -> np.ndarray:
    """Valid `qtype` data for a (rows, cols) weight: random codes, and block scales drawn so that the
    weights' standard deviation is about `spread`. Returns the raw bytes, one row per weight row."""
    block_size, type_size = gguf.constants.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    if qtype == Q.MXFP4:  # one power-of-two scale byte; 2**(e - 128) * 12 is the largest weight
        blocks[:, 0] = rng.integers(121, 124, size=len(blocks))
        return blocks.reshape(rows, -1)
    unit = rng.uniform(0.5, 1.0, size=(len(blocks), 2)) * rng.choice([-1.0, 1.0], size=(len(blocks), 2))
    set_block_scales(blocks, qtype, unit)
    typical = float(np.std(gguf.quants.dequantize(blocks, qtype)))
    set_block_scales(blocks, qtype, unit * spread / typical)
    return blocks.reshape(rows, -1)


def set_block_scales(blocks: np.ndarray, qtype, values: np.ndarray) -> None:
    halves = values.astype(np.float16).view(np.uint16)
    if qtype == Q.IQ1_M:  # its one f16 scale is spread over the top nibbles of four uint16 fields
        fields = blocks[:, 48:56].copy().view(np.uint16)
        nibbles = (halves[:, :1] >> np.arange(0, 16, 4, dtype=np.uint16)) & 0xF
        blocks[:, 48:56] = ((fields & 0x0FFF) | (nibbles << 12)).view(np.uint8)
        return
    for column, offset in enumerate(F16_SCALE_OFFSETS[qtype]):
        blocks[:, offset:offset + 2] = np.ascontiguousarray(halves[:, column:column + 1]).view(np.uint8)


def reference_logits(model, qtype, ids: list[int]) -> np.ndarray:
    """torch logits with every weight replaced by what the GGUF file holds for it."""
    state = {name: torch.from_numpy(round_trip(t.detach().numpy(), qtype)) for name, t in model.state_dict().items()}
    reference = type(model)(model.config).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].numpy()


# ---- HF-side tiny models, one per architecture, for the formats x architectures table ----

ROPE_THETA = 1234.0  # not mlx-lm's fallback of 10000, so a lost rope_theta shows in the logits
HF_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def _hf_classes():
    import transformers as tf

    flat_rope = {"rope_parameters": {"rope_theta": ROPE_THETA, "rope_type": "default"}}
    gemma3_rope = {"rope_parameters": {
        "full_attention": {"rope_theta": ROPE_THETA, "rope_type": "default"},
        "sliding_attention": {"rope_theta": ROPE_THETA / 2, "rope_type": "default"},
    }}
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, flat_rope),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {**flat_rope, "sliding_window": None}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, flat_rope),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {**flat_rope, "head_dim": 16}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, flat_rope),
        # mlx-lm's gemma2 module has no sliding-window mask: keep the window past the test's 12 tokens.
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**flat_rope, "head_dim": 16, "sliding_window": 16}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {**gemma3_rope, "head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2}),
    }


HF_ARCH_NAMES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]


def build_hf_model(name: str, seed: int = 0):
    """A tiny random fp32 transformers model of architecture `name` (one of HF_ARCH_NAMES)."""
    config_class, model_class, extra = _hf_classes()[name]
    torch.manual_seed(seed)
    return randomised(model_class(config_class(**HF_COMMON, vocab_size=len(vocabulary()), **extra)).eval())


def tiny_tokenizer():
    """The tiny byte-level BPE vocabulary as a transformers fast tokenizer, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    merges = [tuple(m.split(" ")) for m in MERGES]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def save_hf_folder(model, dest: Path) -> Path:
    """`save_pretrained` of the model (safetensors) and of the tiny tokenizer into `dest`."""
    model.save_pretrained(dest)
    tiny_tokenizer().save_pretrained(dest)
    return dest


# Token ids every logits comparison feeds both sides (specials, bytes and merged tokens).
IDS = [1, 40, 77, 200, 259, 3, 150, 261, 18, 99, 2, 64]


def mlx_logits(checkpoint: Path, ids: list[int] = IDS) -> np.ndarray:
    """Logits of a converted checkpoint, computed in float32 so that only the stored weights differ."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(checkpoint))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([ids]))[0])


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
