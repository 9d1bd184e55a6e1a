"""SafeTensors sources: folder layouts, dtypes, config normalisation, validation, and damaged input."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from converters.pipeline import ensure_converted
from errors import ConversionError
from tests.conftest import assert_refused_and_cache_untouched, home_with
from tests.tiny_models import IDS, build_hf_model, mlx_logits, save_hf_folder, torch_logits

GATE = "model.layers.0.mlp.gate_proj.weight"



def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save_hf_folder(build_hf_model("llama"), tmp_path_factory.mktemp("llama") / "Tiny-Llama")


# ---- layouts and dtypes ----


def test_sharded_folder_with_index(tmp_path, store):
    model = build_hf_model("qwen3")
    source = save_hf_folder(model, tmp_path / "qwen3")
    model.save_pretrained(source, max_shard_size="40KB")
    (source / "model.safetensors").unlink()
    assert len(list(source.glob("model-*.safetensors"))) > 1 and (source / "model.safetensors.index.json").is_file()

    result = ensure_converted(source, store)

    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


def test_single_file_with_config_beside_it(tmp_path, store):
    model = build_hf_model("mistral")
    folder = save_hf_folder(model, tmp_path / "mistral")
    single = (folder / "model.safetensors").rename(folder / "tiny-mistral.safetensors")

    result = ensure_converted(single, store)

    assert result.entry.format == "safetensors" and result.entry.id == "tiny-mistral"
    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


def test_lone_shard_of_an_indexed_folder_is_refused(tmp_path, store):
    source = save_hf_folder(build_hf_model("llama"), tmp_path / "llama")
    build_hf_model("llama").save_pretrained(source, max_shard_size="40KB")
    shard = sorted(source.glob("model-*.safetensors"))[0]

    with pytest.raises(ConversionError, match="one shard of .* convert the folder"):
        ensure_converted(shard, store)


def digests(folder: Path) -> set[str]:
    return {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")}


def with_unindexed_tensor(folder: Path) -> Path:
    """Add a tensor the index does not list (as old transformers saved rotary buffers): the reader must
    then stream the listed tensors instead of adopting whole files."""
    path = folder / "model.safetensors"
    weights = mx.load(str(path))  # not safetensors.numpy: numpy has no bfloat16
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, path.name)}
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones(8)
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_whole_shards_are_adopted_byte_for_byte(llama_folder, store):
    result = ensure_converted(llama_folder, store)

    assert digests(result.path) == digests(llama_folder)


def test_tensors_the_index_leaves_out_are_streamed_without_them(tmp_path, store):
    model = build_hf_model("phi3")
    source = with_unindexed_tensor(save_hf_folder(model, tmp_path / "phi3"))

    result = ensure_converted(source, store)

    written = mx.load(str(result.path / "model.safetensors"))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in written
    assert digests(result.path) != digests(source)
    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


@pytest.mark.parametrize("layout", ["adopted", "streamed"])
def test_bf16_stays_bf16_beyond_float16_range(tmp_path, store, layout):
    model = build_hf_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 3] = 1.0e5  # float16 tops out at 65504
    source = save_hf_folder(model, tmp_path / "llama-bf16")
    if layout == "streamed":
        with_unindexed_tensor(source)

    weights = mx.load(str(ensure_converted(source, store).path / "model.safetensors"))

    embedding = weights["model.embed_tokens.weight"]
    assert embedding.dtype == mx.bfloat16 and embedding[5, 3].item() == model.model.embed_tokens.weight[5, 3].item() > 65504
    original = model.model.layers[0].mlp.gate_proj.weight.view(torch.int16).numpy()
    assert np.array_equal(np.array(weights[GATE].view(mx.int16)), original)


def test_fp32_stays_fp32_bit_for_bit(llama_folder, store):
    weights = mx.load(str(ensure_converted(llama_folder, store).path / "model.safetensors"))

    source = load_file(llama_folder / "model.safetensors")
    assert weights[GATE].dtype == mx.float32
    assert all(np.array_equal(np.array(weights[name]), array) for name, array in source.items())


# ---- config normalisation ----


def test_transformers5_rope_parameters_become_what_mlx_lm_reads(llama_folder, store):
    assert "rope_theta" not in config_of(llama_folder)

    config = config_of(ensure_converted(llama_folder, store).path)

    assert config["rope_theta"] == 1234.0


def test_gemma3_window_pattern_from_layer_types(tmp_path, store):
    model = build_hf_model("gemma3")
    source = save_hf_folder(model, tmp_path / "gemma3")
    config = config_of(source)
    for key in ("sliding_window_pattern", "_sliding_window_pattern"):
        config.pop(key, None)
    (source / "config.json").write_text(json.dumps(config))

    result = ensure_converted(source, store)

    written = config_of(result.path)
    assert (written["sliding_window_pattern"], written["rope_theta"], written["rope_local_base_freq"]) == (2, 1234.0, 617.0)
    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


def test_gemma2_context_is_capped_at_its_sliding_window(tmp_path, store):
    """mlx-lm's gemma2 module attends globally on every layer; within the window that is exact."""
    model = build_hf_model("gemma2")
    result = ensure_converted(save_hf_folder(model, tmp_path / "gemma2"), store)

    window = model.config.sliding_window
    assert result.entry.context_length == window
    within = IDS[:window]
    assert np.abs(mlx_logits(result.path, within) - torch_logits(model, within)).max() <= 1e-3


# ---- validation against the mlx-lm model ----


def rewrite_weights(folder: Path, change) -> Path:
    path = folder / "model.safetensors"
    weights = load_file(path)
    change(weights)
    save_file(weights, path, metadata={"format": "pt"})
    return path


def copy_of(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop(GATE), f"needs tensor '{GATE}', which is missing"),
        (lambda w: w.update({"model.extra.weight": np.zeros(4, np.float32)}), "has no parameter 'model.extra.weight'"),
        (lambda w: w.update({GATE: w[GATE].reshape(64, 128)}), f"expects '{GATE}' with shape (128, 64), found (64, 128)"),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_checkpoint_that_does_not_fit_the_model_is_refused(llama_folder, tmp_path, store, change, message):
    source = copy_of(llama_folder, tmp_path / "bad")
    rewrite_weights(source, change)

    with pytest.raises(ConversionError) as error:
        ensure_converted(source, store)

    assert str(source) in str(error.value) and message in str(error.value)
    assert store.entries() == [] and list(store.models_dir.iterdir()) == []


def test_tensor_in_two_shards_is_refused(llama_folder, tmp_path, store):
    source = copy_of(llama_folder, tmp_path / "twice")
    weights = load_file(source / "model.safetensors")
    save_file({GATE: weights[GATE]}, source / "model-extra.safetensors")

    with pytest.raises(ConversionError, match=f"tensor '{GATE}' appears more than once"):
        ensure_converted(source, store)


# ---- damaged input through the real CLI ----


def truncate(file: Path) -> Path:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file


def break_header(file: Path) -> Path:
    data = bytearray(file.read_bytes())
    data[8:12] = b"#!?x"  # the JSON header starts at byte 8
    file.write_bytes(bytes(data))
    return file


def lie_about_shape(file: Path) -> Path:
    """Edit one tensor's shape in the header, keeping its length, so the data no longer matches."""
    (size,) = struct.unpack("<Q", file.read_bytes()[:8])
    data = file.read_bytes()
    header = json.loads(data[8 : 8 + size])
    header[GATE]["shape"] = [64, 64]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    text = text.ljust(size)
    file.write_bytes(data[:8] + text + data[8 + size :])
    return file


def remove(file: Path) -> Path:
    file.unlink()
    return file


def remove_tokenizer(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    return folder


@pytest.fixture(scope="module")
def converted_home(llama_folder, tmp_path_factory) -> Path:
    """An Impetus home holding one good conversion, copied by each test that must leave it untouched."""
    return home_with(llama_folder, tmp_path_factory)


@pytest.mark.parametrize(
    "damage, named, expected",
    [
        (lambda f: truncate(f / "model.safetensors"), "model.safetensors", "truncated"),
        (lambda f: break_header(f / "model.safetensors"), "model.safetensors", "bad safetensors header"),
        (lambda f: lie_about_shape(f / "model.safetensors"), "model.safetensors", "has shape [64, 64] (F32) but 32768 bytes"),
        (lambda f: rewrite_weights(f, lambda w: w.update({GATE: w[GATE].reshape(64, 128)})), "bad-input", "expects"),
        (lambda f: remove(f / "config.json"), "bad-input", "no config.json"),
        (remove_tokenizer, "bad-input", "no tokenizer"),
    ],
    ids=["truncated", "bad-header", "header-shape-vs-data", "wrong-shape-for-model", "missing-config", "missing-tokenizer"],
)
def test_damaged_input_is_one_line_error_and_cache_untouched(llama_folder, converted_home, tmp_path, damage, named, expected):
    source = copy_of(llama_folder, tmp_path / "bad-input")
    damage(source)

    assert_refused_and_cache_untouched(source, named, expected, converted_home, tmp_path / "home")


def test_single_file_without_config_is_one_line_error(llama_folder, converted_home, tmp_path):
    lone = tmp_path / "alone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(llama_folder / "model.safetensors", lone)

    assert_refused_and_cache_untouched(lone, "weights.safetensors", "no config.json", converted_home, tmp_path / "home")
