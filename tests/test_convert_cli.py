"""`python convert.py`: the JSON contract, cache hits without heavy imports, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache.store import ModelStore
from tests.conftest import run_cli
from tests.tiny_models import ARCHS, Q, build_model, write_gguf

HEAVY_MODULES = ("mlx", "torch", "transformers", "gguf", "numpy")


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    arch = ARCHS["llama"]
    return write_gguf(build_model(arch), arch, tmp_path / "Tiny-Llama.Q4_0.gguf", Q.Q4_0)


def imported_modules(importtime_log: str) -> set[str]:
    lines = [line.split("|")[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in lines}


def test_json_contract_then_cache_hit_without_heavy_imports(tiny_gguf, tmp_path):
    home = tmp_path / "home"
    first = run_cli("convert.py", str(tiny_gguf), "--json", home=home)
    assert first.returncode == 0, first.stderr
    made = json.loads(first.stdout)
    assert {"path", "format", "architecture", "parameters", "quantization", "size_bytes", "seconds", "cached"} <= made.keys()
    assert (made["format"], made["architecture"], made["cached"]) == ("gguf", "llama", False)
    assert (Path(made["path"]) / "config.json").is_file()
    assert made["size_bytes"] > 0 and made["parameters"] > 0

    again = run_cli("-X", "importtime", "convert.py", str(tiny_gguf), "--json", home=home)
    hit = json.loads(again.stdout)
    assert hit["cached"] is True and hit["path"] == made["path"]
    assert not imported_modules(again.stderr) & set(HEAVY_MODULES)


def test_summary_is_one_screen(tiny_gguf, tmp_path):
    result = run_cli("convert.py", str(tiny_gguf), home=tmp_path / "home")
    assert result.returncode == 0
    assert "tiny-llama-q4_0" in result.stdout and len(result.stdout.splitlines()) <= 24


def truncated(source: Path, dest: Path, keep: int) -> Path:
    dest.write_bytes(source.read_bytes()[:keep])
    return dest


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (lambda src, d: truncated(src, d / "cut.gguf", src.stat().st_size // 2), "truncated"),
        (lambda src, d: truncated(src, d / "header.gguf", 40), "corrupt or truncated"),
        (lambda src, d: (d / "notes.txt").write_text("just some notes\n") and d / "notes.txt", "not a model format"),
        (lambda src, d: d / "missing.gguf", "no such file"),
    ],
    ids=["truncated-data", "truncated-header", "text-file", "missing-path"],
)
def test_bad_input_is_one_line_error_and_cache_untouched(tiny_gguf, tmp_path, make_bad, expected):
    home = tmp_path / "home"
    assert run_cli("convert.py", str(tiny_gguf), home=home).returncode == 0
    before = ModelStore(home).entries()
    bad = make_bad(tiny_gguf, tmp_path)

    result = run_cli("convert.py", str(bad), home=home)

    assert result.returncode != 0
    assert result.stdout == "" and "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0] and str(bad.name) in error_lines[0]
    store = ModelStore(home)
    assert store.entries() == before
    assert sorted(p.name for p in store.models_dir.iterdir()) == [before[0].key]
