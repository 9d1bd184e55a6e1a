"""Never serve garbage silently: NaN or infinite weights and unusable logits refuse a conversion, through
the real CLI, and leave the cache as it was; `--allow-bad-weights` converts with a warning; `--verify`
repeats the checks."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cache.numerics import probe_checkpoint
from cache.store import ModelStore
from errors import BadWeightsError
from tests.conftest import assert_refused_and_cache_untouched, home_with, run_cli
from tests.tiny_models import ARCHS, Q, build_hf_model, build_model, save_hf_folder, write_gguf

REFUSED = "NaN or infinite weights"
FLAT = "same logit for every token"
F16_INFINITY = np.array([np.inf], dtype=np.float16).view(np.uint8)


@pytest.fixture(scope="module")
def clean_gguf(tmp_path_factory) -> Path:
    arch = ARCHS["llama"]
    return write_gguf(build_model(arch), arch, tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q8_0.gguf", Q.Q8_0)


@pytest.fixture(scope="module")
def template_home(clean_gguf, tmp_path_factory) -> Path:
    return home_with(clean_gguf, tmp_path_factory)


def tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """(offset, length) of a GGUF tensor's data in its file."""
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return int(tensor.data_offset), int(tensor.n_bytes)


def planted(source: Path, dest: Path, name: str, at: int, data: bytes) -> Path:
    """A copy of the GGUF `source` with `data` written `at` bytes into tensor `name`'s data."""
    raw = bytearray(source.read_bytes())
    offset, _ = tensor_bytes(source, name)
    raw[offset + at:offset + at + len(data)] = data
    dest.write_bytes(bytes(raw))
    return dest


def test_a_clean_model_converts_and_records_its_checks(clean_gguf, template_home):
    store = ModelStore(template_home)
    [entry] = store.entries()
    checks = entry.checks
    written = load_file(store.checkpoint_path(entry) / "model.safetensors")
    assert checks["passed"] is True
    assert checks["weights"]["tensors_checked"] == len(written) and checks["weights"]["nonfinite_values"] == 0
    assert checks["probe"]["finite"] is True and checks["probe"]["logit_spread"] > 0


def test_nan_in_one_float_tensor_of_a_gguf_is_refused_by_name(clean_gguf, template_home, tmp_path):
    nan = np.full(3, np.nan, dtype=np.float32).tobytes()
    bad = planted(clean_gguf, tmp_path / "nan-norm.gguf", "blk.1.attn_norm.weight", 8, nan)
    assert_refused_and_cache_untouched(bad, "'model.layers.1.input_layernorm.weight' (3 NaN and 0 infinite", REFUSED,
                                       template_home, tmp_path / "home")


def test_an_infinite_block_scale_in_a_quantised_gguf_tensor_is_refused_by_name(clean_gguf, template_home, tmp_path):
    # A Q8_0 block: a float16 scale, then 32 int8 codes; the second block's scale becomes +Inf.
    bad = planted(clean_gguf, tmp_path / "inf-scale.gguf", "blk.0.ffn_down.weight", 34, F16_INFINITY.tobytes())
    assert_refused_and_cache_untouched(bad, "'model.layers.0.mlp.down_proj.scales' (0 NaN and 1 infinite", REFUSED,
                                       template_home, tmp_path / "home")


def test_a_gguf_whose_data_blocks_are_swapped_is_refused(clean_gguf, template_home, tmp_path):
    """Two equal runs of the tensor data trade places, out of step with the blocks: header and sizes intact."""
    reader = gguf.GGUFReader(clean_gguf)
    start = min(int(t.data_offset) for t in reader.tensors)
    length = (clean_gguf.stat().st_size - start) // 3
    first, second = start + 1, start + 1 + length + 17
    raw = bytearray(clean_gguf.read_bytes())
    raw[first:first + length], raw[second:second + length] = raw[second:second + length], raw[first:first + length]
    bad = tmp_path / "swapped.gguf"
    bad.write_bytes(bytes(raw))
    assert bad.stat().st_size == clean_gguf.stat().st_size
    assert_refused_and_cache_untouched(bad, bad.name, REFUSED, template_home, tmp_path / "home")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return save_hf_folder(build_hf_model("llama"), tmp_path_factory.mktemp("hf") / "tiny-llama")


def with_tensors(folder: Path, dest: Path, change) -> Path:
    """A copy of the HF folder with `change(tensors)` applied to its model.safetensors."""
    dest.mkdir()
    for file in folder.iterdir():
        if file.name != "model.safetensors":
            (dest / file.name).write_bytes(file.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def infinity_in_o_proj(tensors: dict) -> None:
    tensors["model.layers.0.self_attn.o_proj.weight"][3, 5] = -np.inf


@pytest.mark.parametrize("options", [[], ["--bits", "4"]], ids=["shards-adopted", "quantised-as-it-streams"])
def test_infinity_in_a_safetensors_tensor_is_refused_by_name(hf_folder, tmp_path, options):
    bad = with_tensors(hf_folder, tmp_path / "bad-llama", infinity_in_o_proj)
    home = tmp_path / "home"
    result = run_cli("convert.py", str(bad), *options, home=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}: {REFUSED} in tensor 'model.layers.0.self_attn.o_proj.weight' (0 NaN and 1 infinite" in result.stderr
    assert "--allow-bad-weights" in result.stderr
    assert ModelStore(home).entries() == [] and not list((home / "models").iterdir())


def zeroed(tensors: dict) -> None:
    for name in tensors:
        tensors[name] = np.zeros_like(tensors[name])


def test_the_probe_refuses_a_model_whose_weights_are_zero(hf_folder, tmp_path):
    bad = with_tensors(hf_folder, tmp_path / "zero-llama", zeroed)
    home = tmp_path / "home"
    result = run_cli("convert.py", str(bad), home=home)
    assert result.returncode == 1 and FLAT in result.stderr and str(bad) in result.stderr, result.stderr
    assert ModelStore(home).entries() == []


def test_the_probe_catches_a_checkpoint_zeroed_after_conversion(template_home, tmp_path):
    store = ModelStore(template_home)
    [entry] = store.entries()
    folder = tmp_path / "zeroed"
    with_tensors(store.checkpoint_path(entry), folder, zeroed)
    assert probe_checkpoint(store.checkpoint_path(entry), entry.id)["finite"]  # the original still passes
    with pytest.raises(BadWeightsError, match=FLAT):
        probe_checkpoint(folder, entry.id)


def test_allowed_bad_weights_convert_with_a_warning_and_verify_then_refuses_them(clean_gguf, tmp_path):
    nan = np.full(3, np.nan, dtype=np.float32).tobytes()
    bad = planted(clean_gguf, tmp_path / "nan-norm.gguf", "blk.1.attn_norm.weight", 8, nan)
    home = tmp_path / "home"

    result = run_cli("convert.py", str(bad), "--allow-bad-weights", "--json", home=home)

    assert result.returncode == 0, result.stderr
    assert "converting despite NaN or infinite values in 1 tensors" in result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert checks["passed"] is False and checks["weights"]["nonfinite_tensors"] == ["model.layers.1.input_layernorm.weight"]
    assert checks["probe"]["finite"] is False  # NaN in a norm reaches every logit

    verified = run_cli("convert.py", "--verify", json.loads(result.stdout)["id"], home=home)
    assert verified.returncode == 1 and REFUSED in verified.stderr and "--remove" in verified.stderr, verified.stderr
    assert "'model.layers.1.input_layernorm.weight'" in verified.stderr


@pytest.fixture(scope="module")
def split_gguf(tmp_path_factory) -> Path:
    """The clean model again, as gguf-py's split writer stores it: three parts of at most 8 tensors."""
    arch = ARCHS["llama"]
    return write_gguf(build_model(arch), arch, tmp_path_factory.mktemp("split") / "Tiny-Llama.Q8_0.gguf", Q.Q8_0,
                      split_max_tensors=8)


def part_names(first: Path) -> list[str]:
    return sorted(path.name for path in first.parent.glob("*.gguf"))


def test_a_split_gguf_converts_from_any_part_to_the_same_model_as_the_whole_file(split_gguf, clean_gguf, tmp_path):
    assert part_names(split_gguf) == [f"Tiny-Llama.Q8_0-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    whole = json.loads(run_cli("convert.py", str(clean_gguf), "--json", home=tmp_path / "a").stdout)
    result = run_cli("convert.py", str(split_gguf.with_name("Tiny-Llama.Q8_0-00002-of-00003.gguf")), "--json",
                     home=tmp_path / "b")
    assert result.returncode == 0, result.stderr
    split = json.loads(result.stdout)
    assert split["id"] == whole["id"] == "tiny-llama-q8_0" and split["checks"]["passed"]
    ours, theirs = (load_file(Path(made["path"]) / "model.safetensors") for made in (split, whole))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[name], theirs[name]) for name in ours)


def copy_parts(first: Path, dest: Path, renamed: dict[str, str] | None = None, left_out: str | None = None) -> Path:
    """The parts of a split GGUF in `dest`, some renamed (old name -> new) or one left out."""
    dest.mkdir()
    for name in part_names(first):
        if name != left_out:
            (dest / (renamed or {}).get(name, name)).write_bytes((first.parent / name).read_bytes())
    return dest / first.name


@pytest.mark.parametrize("damage, expected", [
    ({"left_out": "Tiny-Llama.Q8_0-00003-of-00003.gguf"}, "split GGUF part Tiny-Llama.Q8_0-00003-of-00003.gguf is missing"),
    ({"renamed": {"Tiny-Llama.Q8_0-00002-of-00003.gguf": "Tiny-Llama.Q8_0-00003-of-00003.gguf",
                  "Tiny-Llama.Q8_0-00003-of-00003.gguf": "Tiny-Llama.Q8_0-00002-of-00003.gguf"}},
     "its metadata says it is part 3 of 3, its name part 2 of 3"),
], ids=["part-missing", "parts-swapped"])
def test_split_parts_are_joined_only_whole_and_in_their_order(split_gguf, template_home, tmp_path, damage, expected):
    first = copy_parts(split_gguf, tmp_path / "parts", **damage)
    assert_refused_and_cache_untouched(first, "Tiny-Llama.Q8_0-0000", expected, template_home, tmp_path / "home")
