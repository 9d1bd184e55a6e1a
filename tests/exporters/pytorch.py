"""HF folder whose weights are `pytorch_model.bin` written by `torch.save(model.state_dict())`
(transformers 5 always writes safetensors from `save_pretrained`), plus config.json and the tokenizer."""

import json
from pathlib import Path

import torch

from tests.tiny_models import tiny_tokenizer


def export(model, arch: str, dest: Path) -> Path:
    folder = dest / f"{arch}-pytorch"
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ---- Meta's own layout: consolidated.NN.pth model-parallel shards + params.json ----

HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
# The axis fairscale's parallel layers split: column-parallel by output rows, row-parallel by input columns.
SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_name(hf_name: str) -> str:
    module = hf_name.removesuffix(".weight")
    if module.startswith("model.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"layers.{index}.{HF_TO_META[rest]}.weight"
    return {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}[module] + ".weight"


def hf_to_meta_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of transformers' convert_llama_weights_to_hf permute: back to interleaved pairs."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_split_axis(name: str, vocab_split: bool) -> int | None:
    if name.startswith("tok_embeddings"):
        return 0 if vocab_split else 1
    return SPLIT_AXIS.get(name.split(".")[-2])


def meta_tensors(model) -> dict[str, torch.Tensor]:
    config = model.config
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            tensor = hf_to_meta_rope(tensor, heads)
        tensors[meta_name(hf_name)] = tensor.clone()
    return tensors


def export_meta(model, dest: Path, params: dict, shards: int = 2, vocab_split: bool = False) -> Path:
    """A Meta llama checkpoint: `shards` consolidated.NN.pth files, params.json and the tokenizer."""
    dest.mkdir(parents=True)
    tensors = meta_tensors(model)
    for number in range(shards):
        shard = {name: piece(t, meta_split_axis(name, vocab_split), number, shards) for name, t in tensors.items()}
        shard["rope.freqs"] = torch.ones(model.config.head_dim // 2)  # Llama 1/2 files carry it; nothing reads it
        torch.save(shard, dest / f"consolidated.{number:02d}.pth")
    (dest / "params.json").write_text(json.dumps(params))
    tiny_tokenizer().save_pretrained(dest)
    return dest


def piece(tensor: torch.Tensor, axis: int | None, number: int, shards: int) -> torch.Tensor:
    return tensor.clone() if axis is None else tensor.chunk(shards, dim=axis)[number].clone()
