"""PyTorch reader: HF `pytorch_model*.bin` folders, single `.pt`/`.pth`/`.bin` state dicts, and Meta
`consolidated.*.pth` + `params.json` checkpoints.

Every pickle goes through torch's weights-only unpickler, so a file that needs any global outside its
allowed set (tensors and plain containers) is refused before anything in it runs. Zip checkpoints are
memory-mapped; tensors become MLX arrays one at a time as the writer asks for them.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import torch

from converters import sniff
from converters.hf import hf_source, normalise_config, read_config, sidecar_folder
from converters.source import SourceModel
from errors import ConversionError

log = logging.getLogger(__name__)

# Where training scripts nest the weights inside a checkpoint dict, in the order we look.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Buffers that older transformers versions saved but no model loads.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# How deep a wrapper prefix (`module.`, `_orig_mod.module.`, `base_model.model.`) may go.
MAX_PREFIX_DOTS = 3


@dataclass(frozen=True)
class Planned:
    """A tensor of the output checkpoint, made only when the writer reaches it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def read(path: Path) -> SourceModel:
    if is_meta_layout(path):
        return read_meta(path)
    state = load_checkpoint(checkpoint_files(path), path)
    config = read_config(sidecar_folder(path), path)
    expected = expected_tensors(config, path)
    plan = {name: planned(tensor) for name, tensor in match_names(state, expected, path).items()}
    return build_source(path, config, plan, expected)


def build_source(path: Path, config: dict, plan: dict[str, Planned], expected: Expected) -> SourceModel:
    check_shapes(plan, expected, path)
    check_dtypes(plan, path)
    parameters = sum(math.prod(p.shape) for p in plan.values())
    return hf_source(path, config, lambda: ((name, to_mlx(p.make())) for name, p in plan.items()), parameters)


def planned(tensor: torch.Tensor) -> Planned:
    return Planned(tuple(tensor.shape), tensor.dtype, lambda: tensor)


# ---- which files hold the weights ----


def checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        refuse_lone_shard(path)
        return [path]
    index = next(iter(sorted(path.glob("*.bin.index.json"))), None)
    if index is not None:
        return sharded_files(index)
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    return [single_checkpoint_in(path)]


def refuse_lone_shard(path: Path) -> None:
    for index in path.parent.glob("*.bin.index.json"):
        if path.name in weight_map(index).values():
            raise ConversionError(f"{path}: one shard of the checkpoint indexed by {index.name}; convert the folder {path.parent} instead")


def weight_map(index: Path) -> dict[str, str]:
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index}: not a valid shard index, expected JSON with a 'weight_map' object ({exc})") from exc


def sharded_files(index: Path) -> list[Path]:
    files = [index.parent / name for name in sorted(set(weight_map(index).values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{index}: shard files listed in the index are missing: {', '.join(missing)}")
    return files


def single_checkpoint_in(folder: Path) -> Path:
    found = [p for p in sniff.top_files(folder) if p.suffix in TORCH_SUFFIXES and sniff.is_pytorch_file(p)]
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ConversionError(f"{folder}: expected one PyTorch checkpoint (pytorch_model.bin, *.pt, *.pth), found {names}; pass the file to convert")
    return found[0]


# ---- loading, safely ----


def load_checkpoint(files: list[Path], source: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        shard = load_state_dict(file)
        duplicated = state.keys() & shard.keys()
        if duplicated:
            raise ConversionError(f"{file}: tensor '{min(duplicated)}' also appears in another shard of {source}")
        state.update(shard)
    return state


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    return find_state_dict(torch_load(file), file)


def torch_load(file: Path):
    """torch.load with the weights-only unpickler; mmap where the file is a zip checkpoint."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as exc:
        raise ConversionError(refusal(file, str(exc))) from None
    except OSError as exc:
        raise ConversionError(f"{file}: cannot read the file ({exc.strerror or exc})") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ConversionError(f"{file}: not a readable PyTorch checkpoint ({key_line(str(exc)) or type(exc).__name__}); "
                              "the file is corrupt or truncated, save or download it again") from exc
    for warning in caught:
        log.debug("torch.load %s: %s", file, warning.message)
    return loaded


def refusal(file: Path, message: str) -> str:
    needs = re.search(r"GLOBAL ([\w.]+)", message)
    globals_ = [needs.group(1)] if needs else pickle_globals(file)
    if globals_:
        what = f"the pickle needs {', '.join(globals_)}, outside the weights-only allowed set (tensors and plain containers)"
    else:
        what = f"not a weights-only PyTorch pickle ({key_line(message)})"
    return f"{file}: refused to load, {what}; nothing in it was run. Save plain weights with torch.save(model.state_dict()) or as safetensors"


def key_line(message: str) -> str:
    """The informative line of torch's multi-line error messages."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    informative = [line for line in lines if not line.startswith(boilerplate)]
    return (informative or lines or [""])[0].split(". ")[0]


def pickle_globals(file: Path) -> list[str]:
    """The module.name globals a pickle imports, read opcode by opcode without running anything."""
    strings: list[str] = []
    found: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(pickle_bytes(file)):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError as exc:
        log.debug("%s: pickle scan stopped early (%s)", file, exc)
    return sorted(set(found))


def pickle_bytes(file: Path) -> bytes:
    if not zipfile.is_zipfile(file):
        return file.read_bytes()
    with zipfile.ZipFile(file) as archive:
        member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
        return archive.read(member) if member else b""


def find_state_dict(loaded, file: Path, depth: int = 0) -> dict[str, torch.Tensor]:
    if is_state_dict(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping) and depth < 3:
        for key in STATE_DICT_KEYS:
            if key in loaded:
                return find_state_dict(loaded[key], file, depth + 1)
    raise ConversionError(f"{file}: holds no state dict (a mapping of names to tensors, at the top level or under "
                          f"'state_dict'/'model'); found {describe(loaded)}")


def is_state_dict(value) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def describe(value) -> str:
    if isinstance(value, Mapping):
        keys = ", ".join(map(str, list(value)[:6]))
        return f"a {type(value).__name__} with keys {keys}" if keys else "an empty mapping"
    return f"a {type(value).__name__}"


# ---- HF names: what the model expects, and matching the checkpoint's names to them ----


@dataclass(frozen=True)
class Expected:
    shapes: dict[str, tuple[int, ...]]  # every name in the transformers model's state dict
    required: frozenset[str]  # less the tied copies (lm_head when tied), which mlx-lm ties itself


def expected_tensors(config: dict, source: Path) -> Expected:
    """Names and shapes from the transformers model for this config, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"{source}: transformers cannot build a {config.get('model_type')} model from its config ({exc})") from exc
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return Expected(shapes, frozenset(own & shapes.keys()))


def match_names(state: dict[str, torch.Tensor], expected: Expected, source: Path) -> dict[str, torch.Tensor]:
    rename = best_renaming(list(state), expected.shapes.keys())
    renamed = {rename(name): tensor for name, tensor in state.items()}
    kept = {name: t for name, t in renamed.items() if name in expected.required}
    ignored = sorted(n for n in renamed.keys() - expected.shapes.keys() if n.endswith(IGNORED_SUFFIXES))
    if ignored:
        log.info("%s: ignoring %d unused buffers such as %s", source, len(ignored), ignored[0])
    check_names(renamed.keys() - set(ignored), expected, source)
    return kept


def best_renaming(names: list[str], expected) -> Callable[[str], str]:
    """The wrapper prefix to strip (and `model.` to add back) under which most names are the HF ones."""
    expected = set(expected)
    candidates = sorted({""} | {prefix for name in names for prefix in dotted_prefixes(name)}, key=len)
    best = max(candidates, key=lambda prefix: sum(renamed(n, prefix, expected) in expected for n in names))
    if best:
        log.info("stripping the prefix '%s' from tensor names", best)
    return lambda name: renamed(name, best, expected)


def dotted_prefixes(name: str) -> list[str]:
    parts = name.split(".")[:MAX_PREFIX_DOTS]
    return [".".join(parts[: i + 1]) + "." for i in range(len(parts) - 1)]


def renamed(name: str, prefix: str, expected: set[str]) -> str:
    stripped = name[len(prefix):] if prefix and name.startswith(prefix) else name
    if stripped not in expected and f"model.{stripped}" in expected:
        return f"model.{stripped}"
    return stripped


def check_names(names: set[str], expected: Expected, source: Path) -> None:
    unexpected = sorted(names - expected.shapes.keys())
    if unexpected:
        raise ConversionError(f"{source}: {len(unexpected)} tensors are not part of the model its config describes, "
                              f"e.g. {', '.join(unexpected[:3])}")
    missing = sorted(expected.required - names)
    if missing:
        raise ConversionError(f"{source}: the checkpoint lacks {len(missing)} of the model's tensors, e.g. {', '.join(missing[:3])}")


def check_shapes(plan: dict[str, Planned], expected: Expected, source: Path) -> None:
    for name, planned_tensor in plan.items():
        if planned_tensor.shape != expected.shapes[name]:
            raise ConversionError(f"{source}: tensor '{name}' has shape {list(planned_tensor.shape)}, "
                                  f"but the config implies {list(expected.shapes[name])}")


def check_dtypes(plan: dict[str, Planned], source: Path) -> None:
    for name, planned_tensor in plan.items():
        if planned_tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ConversionError(f"{source}: tensor '{name}' is {planned_tensor.dtype}; only float32, float16 and bfloat16 "
                                  "checkpoints are supported (quantised PyTorch checkpoints are not)")


def to_mlx(tensor: torch.Tensor) -> mx.array:
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: move the raw bits, then reinterpret them in MLX.
        return mx.array(tensor.view(torch.uint16).numpy()).view(mx.bfloat16)
    if tensor.dtype == torch.float64:
        return mx.array(tensor.to(torch.float32).numpy())
    return mx.array(tensor.numpy())


# ---- Meta consolidated.*.pth + params.json ----

META_SHARD = re.compile(r"consolidated\.\d+\.pth")
META_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
# Meta name -> (HF name, axis the model-parallel shards split, heads whose rope rows Meta interleaves).
META_GLOBAL_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding", None),
    "norm.weight": ("model.norm.weight", None, None),
    "output.weight": ("lm_head.weight", 0, None),
}
META_LAYER_NAMES = {
    "attention.wq": ("self_attn.q_proj", 0, "n_heads"),
    "attention.wk": ("self_attn.k_proj", 0, "n_kv_heads"),
    "attention.wv": ("self_attn.v_proj", 0, None),
    "attention.wo": ("self_attn.o_proj", 1, None),
    "feed_forward.w1": ("mlp.gate_proj", 0, None),
    "feed_forward.w2": ("mlp.down_proj", 1, None),
    "feed_forward.w3": ("mlp.up_proj", 0, None),
    "attention_norm": ("input_layernorm", None, None),
    "ffn_norm": ("post_attention_layernorm", None, None),
}
META_IGNORED = {"rope.freqs"}


def is_meta_layout(path: Path) -> bool:
    folder = sidecar_folder(path)
    shard_named = META_SHARD.fullmatch(path.name) if path.is_file() else meta_shards_in(folder)
    return bool(shard_named) and (folder / "params.json").is_file()


def meta_shards_in(folder: Path) -> list[Path]:
    return [p for p in sniff.top_files(folder) if META_SHARD.fullmatch(p.name)]


def meta_shards(path: Path) -> list[Path]:
    shards = meta_shards_in(sidecar_folder(path))
    if path.is_file() and len(shards) > 1:
        raise ConversionError(f"{path}: one of {len(shards)} model-parallel shards; convert the folder {path.parent} instead")
    return shards


def read_meta(path: Path) -> SourceModel:
    params = read_params(sidecar_folder(path) / "params.json")
    shards = [load_state_dict(file) for file in meta_shards(path)]
    check_same_names(shards, path)
    plan = meta_plan(shards, params, path)
    config = normalise_config(meta_config(params, plan, path), path)
    expected = expected_tensors(config, path)
    check_names(set(plan), expected, path)
    return build_source(path, config, plan, expected)


def read_params(file: Path) -> dict:
    try:
        params = json.loads(file.read_text())
    except ValueError as exc:
        raise ConversionError(f"{file}: not valid JSON ({exc})") from exc
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise ConversionError(f"{file}: lacks {', '.join(missing)}, needed to rebuild the model config")
    return params


def check_same_names(shards: list[dict], source: Path) -> None:
    first = set(shards[0])
    for number, shard in enumerate(shards[1:], start=1):
        if set(shard) != first:
            odd = sorted(first ^ set(shard))[0]
            raise ConversionError(f"{source}: shard {number} and shard 0 hold different tensors (e.g. '{odd}'); the shards do not belong together")


def meta_plan(shards: list[dict], params: dict, source: Path) -> dict[str, Planned]:
    plan = {}
    for meta_name in shards[0]:
        if meta_name in META_IGNORED:
            continue
        hf_name, axis, heads_key = meta_mapping(meta_name, source)
        pieces = [shard[meta_name] for shard in shards]
        if axis == "embedding":
            axis = embedding_axis(pieces, params["dim"])
        check_pieces(meta_name, pieces, axis, source)
        heads = (params.get(heads_key) or params["n_heads"]) if heads_key else None
        plan[hf_name] = merged(pieces, axis, heads)
    return plan


def meta_mapping(meta_name: str, source: Path) -> tuple[str, object, str | None]:
    if meta_name in META_GLOBAL_NAMES:
        return META_GLOBAL_NAMES[meta_name]
    layer = META_LAYER.fullmatch(meta_name)
    if layer and layer.group(2) in META_LAYER_NAMES:
        hf_module, axis, heads_key = META_LAYER_NAMES[layer.group(2)]
        return f"model.layers.{layer.group(1)}.{hf_module}.weight", axis, heads_key
    raise ConversionError(f"{source}: unknown tensor '{meta_name}' for a Meta llama checkpoint")


def embedding_axis(pieces: list[torch.Tensor], dim: int) -> int:
    # Llama 1/2 split the embedding width across shards, Llama 3 splits the vocabulary.
    return 0 if pieces[0].shape[1] == dim else 1


def check_pieces(meta_name: str, pieces: list[torch.Tensor], axis: int | None, source: Path) -> None:
    """Shards may differ only along the axis they split; replicated tensors not at all."""
    def kept(shape) -> list[int]:
        return [size for dim, size in enumerate(shape) if dim != axis]

    shapes = [list(piece.shape) for piece in pieces]
    if any(kept(shape) != kept(shapes[0]) for shape in shapes):
        raise ConversionError(f"{source}: the shards' pieces of '{meta_name}' have shapes {shapes}, which do not fit together")


def merged(pieces: list[torch.Tensor], axis: int | None, heads: int | None) -> Planned:
    shape = list(pieces[0].shape)
    if axis is not None:
        shape[axis] = sum(piece.shape[axis] for piece in pieces)

    def make() -> torch.Tensor:
        whole = pieces[0] if axis is None or len(pieces) == 1 else torch.cat(pieces, dim=axis)
        return meta_rope_to_hf(whole, heads) if heads else whole

    return Planned(tuple(shape), pieces[0].dtype, make)


def meta_rope_to_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs within each head; HF rotates the two halves: regroup the rows."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_config(params: dict, plan: dict[str, Planned], source: Path) -> dict:
    heads = params["n_heads"]
    rope_theta = float(params.get("rope_theta", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params["dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "head_dim": meta_shape(plan, "model.layers.0.self_attn.q_proj.weight", source)[0] // heads,
        "intermediate_size": meta_shape(plan, "model.layers.0.mlp.gate_proj.weight", source)[0],
        "vocab_size": meta_shape(plan, "model.embed_tokens.weight", source)[0],
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in plan,
        # params.json rarely states the context; Meta's code used 4096 for Llama 2 and 8192 for Llama 3.
        "max_position_embeddings": params.get("max_seq_len") or (8192 if rope_theta >= 500000 else 4096),
    }
    if params.get("use_scaled_rope"):
        config.update(llama3_rope_scaling(params))
    return config


def meta_shape(plan: dict[str, Planned], name: str, source: Path) -> tuple[int, ...]:
    if name not in plan:
        raise ConversionError(f"{source}: the Meta checkpoint lacks the tensor that becomes '{name}'")
    return plan[name].shape


def llama3_rope_scaling(params: dict) -> dict:
    """Llama 3.1+ `use_scaled_rope`: the constants of Meta's reference apply_scaling."""
    scaling = {
        "rope_type": "llama3",
        "factor": float(params.get("rope_scaling_factor", 8.0)),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return {"rope_scaling": scaling, "max_position_embeddings": params.get("max_seq_len") or 131072}
