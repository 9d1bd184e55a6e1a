"""MLX sources: folders written by `mlx_lm.convert` are adopted without rewriting; `.npz` with a
config beside it; damaged input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from converters.pipeline import ensure_converted
from errors import ConversionError
from tests.conftest import home_with
from tests.exporters.mlx import export
from tests.test_format_safetensors import (
    IDS,
    assert_refused_and_cache_untouched,
    break_header,
    mlx_logits,
    remove,
    remove_tokenizer,
    truncate,
)
from tests.tiny_models import build_hf_model, torch_logits

Q_PROJ = "model.layers.0.self_attn.q_proj"


def export_4bit(arch: str, dest: Path):
    model = build_hf_model(arch)
    return model, export(model, arch, dest, quantize=True, q_bits=4, q_group_size=32)


def file_digests(folder: Path) -> set[str]:
    return {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")}


def dequantised_reference(model, mlx_folder: Path, ids: list[int]) -> np.ndarray:
    """torch logits with every weight replaced by what the MLX checkpoint holds, dequantised by MLX."""
    block = json.loads((mlx_folder / "config.json").read_text())["quantization"]
    weights = mx.load(str(mlx_folder / "model.safetensors"))
    state = model.state_dict()
    for name in state:
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.scales" in weights:
            value = mx.dequantize(weights[name], weights[f"{module}.scales"], weights[f"{module}.biases"],
                                  group_size=block["group_size"], bits=block["bits"])
        elif name in weights:
            value = weights[name]
        else:
            continue  # a tied lm_head, which follows the embedding
        state[name] = torch.from_numpy(np.array(value.astype(mx.float32)))
    reference = type(model)(model.config).eval()
    reference.load_state_dict(state)
    return torch_logits(reference, ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantised_folder_is_adopted_unchanged_and_matches_its_dequantised_reference(arch, tmp_path, store):
    model, source = export_4bit(arch, tmp_path)

    result = ensure_converted(source, store)

    assert result.entry.format == "mlx" and result.entry.quantization == "4-bit affine, group 32"
    assert file_digests(result.path) == file_digests(source)
    config = json.loads((result.path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["rope_theta"] == 1234.0
    expected = dequantised_reference(model, source, IDS)
    assert np.abs(mlx_logits(result.path) - expected).max() <= 1e-3


def test_parameters_count_the_unpacked_weights(tmp_path, store):
    model, source = export_4bit("llama", tmp_path)

    result = ensure_converted(source, store)

    assert result.entry.parameters == sum(p.numel() for p in model.parameters())


def npz_folder(mlx_folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for file in mlx_folder.iterdir():
        if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json":
            shutil.copy(file, dest / file.name)
    mx.savez(str(dest / "weights.npz"), **mx.load(str(mlx_folder / "model.safetensors")))
    return dest / "weights.npz"


def test_npz_with_config_beside_it(tmp_path, store):
    model = build_hf_model("phi3")
    npz = npz_folder(export(model, "phi3", tmp_path), tmp_path / "npz")

    result = ensure_converted(npz, store)

    assert result.entry.format == "mlx"
    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


def test_tensor_in_two_shards_is_refused(tmp_path, store):
    _, source = export_4bit("llama", tmp_path)
    scales = mx.load(str(source / "model.safetensors"))[f"{Q_PROJ}.scales"]
    mx.save_safetensors(str(source / "model-extra.safetensors"), {f"{Q_PROJ}.scales": scales}, metadata={"format": "mlx"})
    (source / "model.safetensors.index.json").unlink()  # an index would name one place for each tensor

    with pytest.raises(ConversionError, match=f"tensor '{Q_PROJ}.scales' appears more than once"):
        ensure_converted(source, store)
    assert store.entries() == []


def test_model_type_mlx_lm_lacks_is_refused(tmp_path, store):
    _, source = export_4bit("llama", tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))

    with pytest.raises(ConversionError, match="mlx-lm cannot build its model .*no_such_model"):
        ensure_converted(source, store)
    assert store.entries() == []


# ---- damaged input through the real CLI ----


# Each damage returns what to convert: the damaged folder, or a file made from it.


def wrong_scales(folder: Path) -> Path:
    path = folder / "model.safetensors"
    weights = mx.load(str(path))
    weights[f"{Q_PROJ}.scales"] = weights[f"{Q_PROJ}.scales"][:, :1]
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return folder


def npz_without_config(folder: Path) -> Path:
    remove(folder / "config.json")
    return npz_folder(folder, folder.parent / "npz")


def in_folder(damage_file):
    return lambda folder: damage_file(folder) and folder


@pytest.fixture(scope="module")
def mlx_folder(tmp_path_factory) -> Path:
    return export_4bit("llama", tmp_path_factory.mktemp("mlx"))[1]


@pytest.fixture(scope="module")
def mlx_home(mlx_folder, tmp_path_factory) -> Path:
    return home_with(mlx_folder, tmp_path_factory)


@pytest.mark.parametrize(
    "damage, named, expected",
    [
        (in_folder(lambda f: truncate(f / "model.safetensors")), "model.safetensors", "truncated"),
        (in_folder(lambda f: break_header(f / "model.safetensors")), "model.safetensors", "bad safetensors header"),
        # mlx-lm infers the group size from the scales, so it is the biases that no longer fit.
        (wrong_scales, "bad-mlx", f"expects '{Q_PROJ}.biases' with shape (64, 1), found (64, 2)"),
        (remove_tokenizer, "bad-mlx", "no tokenizer"),
        (in_folder(lambda f: remove(f / "config.json")), "bad-mlx", "no config.json"),
        (npz_without_config, "weights.npz", "no config.json"),
    ],
    ids=["truncated", "bad-header", "wrong-shape", "missing-tokenizer", "missing-config", "npz-missing-config"],
)
def test_damaged_input_is_one_line_error_and_cache_untouched(mlx_folder, mlx_home, tmp_path, damage, named, expected):
    source = damage(Path(shutil.copytree(mlx_folder, tmp_path / "bad-mlx")))

    assert_refused_and_cache_untouched(source, named, expected, mlx_home, tmp_path / "home")
