"""PyTorch sources beyond the equivalence table: wrapped and prefixed state dicts, sharded bins, bf16,
Meta's consolidated layout, pickles that would run code, and broken input through `python convert.py`."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cache.store import ModelStore
from converters.pipeline import ensure_converted
from tests.conftest import run_cli
from tests.exporters.pytorch import export, export_meta
from tests.tiny_models import HF_COMMON, IDS, ROPE_THETA, build_hf_model, mlx_logits, randomised, tiny_tokenizer, torch_logits, vocabulary

# Long enough for the low rope frequencies, where Llama 3's scaled rope differs, to turn noticeably.
LONG_IDS = [(7 * i) % 259 + 3 for i in range(400)]
TOLERANCE = 1e-3


def converted(source: Path, store: ModelStore):
    result = ensure_converted(source, store)
    assert result.entry.format == "pytorch"
    return result



def with_sidecars(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ---- state dicts as training scripts write them ----


def wrapped_by_ddp(model) -> dict:
    state = {f"module.{name}": tensor for name, tensor in model.state_dict().items()}
    state["module.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # what transformers 4.30 saved
    return {"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}


def inner_model_only(model) -> dict:
    # `model.model.state_dict()` plus the head: names lack transformers' leading `model.`
    state = {name.removeprefix("model."): tensor for name, tensor in model.state_dict().items()}
    return {"model": state}


@pytest.mark.parametrize("arch, wrap", [("llama", wrapped_by_ddp), ("gemma3", inner_model_only)], ids=["ddp-prefix", "no-model-prefix"])
def test_nested_prefixed_state_dict_matches_torch(arch, wrap, tmp_path, store):
    model = build_hf_model(arch)
    folder = with_sidecars(model, tmp_path / "run")
    torch.save(wrap(model), folder / "last.pt")

    result = converted(folder / "last.pt", store)

    assert np.abs(mlx_logits(result.path, IDS) - torch_logits(model, IDS)).max() <= TOLERANCE


def test_sharded_pytorch_model_bin_matches_torch(tmp_path, store):
    model = build_hf_model("qwen2")
    folder = with_sidecars(model, tmp_path / "qwen2-sharded")
    state = model.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    for file, shard_names in shards.items():
        torch.save({name: state[name] for name in shard_names}, folder / file)
    index = {"weight_map": {name: file for file, shard_names in shards.items() for name in shard_names}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    result = converted(folder, store)

    assert np.abs(mlx_logits(result.path, IDS) - torch_logits(model, IDS)).max() <= TOLERANCE


def test_bf16_checkpoint_stays_bf16_bit_for_bit(tmp_path, store):
    model = build_hf_model("llama").to(torch.bfloat16)
    source = export(model, "llama", tmp_path)

    result = converted(source, store)

    written = mx.load(str(result.path / "model.safetensors"))
    assert {array.dtype for array in written.values()} == {mx.bfloat16}
    for name, tensor in model.state_dict().items():
        assert np.array_equal(np.array(written[name].astype(mx.float32)), tensor.float().numpy()), name
    # A fresh fp32 model with the bf16 values: `model.float()` would keep rope's inv_freq rounded to bf16.
    reference = build_hf_model("llama")
    reference.load_state_dict({name: tensor.float() for name, tensor in model.state_dict().items()})
    assert np.abs(mlx_logits(result.path, IDS) - torch_logits(reference, IDS)).max() <= TOLERANCE


# ---- Meta consolidated.*.pth + params.json ----


def tiny_llama(rope_parameters: dict):
    torch.manual_seed(0)
    config = LlamaConfig(**HF_COMMON, vocab_size=len(vocabulary()), rope_parameters=rope_parameters)
    return randomised(LlamaForCausalLM(config).eval())


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
META_LAYOUTS = {
    # Llama 2: the embedding width is split across shards, plain rope.
    "llama2": ({"rope_type": "default", "rope_theta": ROPE_THETA}, {}, False),
    # Llama 3.1: the vocabulary is split across shards, rope scaled by Meta's apply_scaling.
    "llama3.1": (LLAMA3_ROPE, {"use_scaled_rope": True, "vocab_size": len(vocabulary())}, True),
}


@pytest.mark.parametrize("layout", META_LAYOUTS)
def test_meta_consolidated_shards_match_torch(layout, tmp_path, store):
    rope, extra_params, vocab_split = META_LAYOUTS[layout]
    model = tiny_llama(rope)
    config = model.config
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps, "rope_theta": ROPE_THETA,
              "multiple_of": 32, **extra_params}
    source = export_meta(model, tmp_path / f"{layout}-meta", params, shards=2, vocab_split=vocab_split)

    result = converted(source, store)

    written = json.loads((result.path / "config.json").read_text())
    assert (written["rope_theta"], written["num_key_value_heads"], written["intermediate_size"]) == (ROPE_THETA, 2, 128)
    assert np.abs(mlx_logits(result.path, LONG_IDS) - torch_logits(model, LONG_IDS)).max() <= TOLERANCE


# ---- through `python convert.py`: unsafe and broken files ----


class RunsShellCommand:
    """A pickle payload: unpickling it runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plain_pickle(payload, folder: Path) -> Path:
    path = folder / "weights.pt"
    path.write_bytes(pickle.dumps(payload))
    return path


def zip_bin(payload, folder: Path) -> Path:
    torch.save(payload, folder / "pytorch_model.bin")
    return folder


def unsafe_load(source: Path) -> None:
    """What a loader without the weights-only unpickler would do (the control that proves the payload is live)."""
    if source.is_dir():
        torch.load(source / "pytorch_model.bin", weights_only=False)
    else:
        pickle.loads(source.read_bytes())


def error_line(result) -> str:
    assert result.returncode != 0
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def good_home(tmp_path_factory):
    """An IMPETUS_HOME holding one entry, converted from a good `.pt`, that failures must leave alone."""
    root = tmp_path_factory.mktemp("pytorch-cli")
    model = build_hf_model("llama")
    folder = with_sidecars(model, root / "good")
    torch.save(model.state_dict(), folder / "good.pt")
    home = root / "home"
    assert run_cli("convert.py", str(folder / "good.pt"), home=home).returncode == 0
    return home, folder / "good.pt"


def assert_cache_untouched(home: Path, before: list) -> None:
    store = ModelStore(home)
    assert store.entries() == before and len(before) == 1
    assert sorted(p.name for p in store.models_dir.iterdir()) == [before[0].key]


@pytest.mark.parametrize("write", [plain_pickle, zip_bin], ids=["plain-pickle-pt", "zip-bin"])
def test_code_running_pickle_is_refused_and_never_runs(write, good_home, tmp_path):
    home, _ = good_home
    before = ModelStore(home).entries()
    marker = tmp_path / "MARKER"
    source = write(RunsShellCommand(marker), with_sidecars(build_hf_model("llama"), tmp_path / "evil"))

    line = error_line(run_cli("convert.py", str(source), home=home))

    assert "refused" in line and "system" in line and source.name in line
    assert not marker.exists()
    assert_cache_untouched(home, before)
    unsafe_load(source)
    assert marker.exists(), "the payload is live: an unsafe load runs it"


def truncated(good: Path, folder: Path) -> Path:
    path = folder / "cut.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def training_state_only(good: Path, folder: Path) -> Path:
    torch.save({"epoch": 3, "lr": 0.1}, folder / "trainer_state.pt")
    return folder / "trainer_state.pt"


def sidecars_without(good: Path, folder: Path, *names: str) -> Path:
    """A new run folder beside `good`'s sidecars, less `names`, holding other weights (so no cache hit)."""
    run = folder / "run"
    run.mkdir()
    for file in good.parent.iterdir():
        if file.suffix != ".pt" and file.name not in names:
            (run / file.name).write_bytes(file.read_bytes())
    return run


def other_weights() -> dict:
    return build_hf_model("llama", seed=1).state_dict()


def without(*names: str):
    def make(good: Path, folder: Path) -> Path:
        path = sidecars_without(good, folder, *names) / "weights.pt"
        torch.save(other_weights(), path)
        return path
    return make


def wrong_shape(good: Path, folder: Path) -> Path:
    state = other_weights()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    path = sidecars_without(good, folder) / "weights.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (truncated, "corrupt or truncated"),
        (training_state_only, "holds no state dict"),
        (without("config.json"), "no config.json"),
        (without("tokenizer.json", "tokenizer_config.json"), "no tokenizer"),
        (wrong_shape, "model.layers.1.mlp.up_proj.weight' has shape [96, 64]"),
    ],
    ids=["truncated-zip", "not-a-checkpoint", "missing-config", "missing-tokenizer", "wrong-shape"],
)
def test_broken_input_is_one_line_error_and_cache_untouched(make_bad, expected, good_home, tmp_path):
    home, good = good_home
    before = ModelStore(home).entries()
    bad = make_bad(good, tmp_path)

    line = error_line(run_cli("convert.py", str(bad), home=home))

    assert expected in line and bad.name in line
    assert_cache_untouched(home, before)
