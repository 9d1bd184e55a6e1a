"""The store keys entries by content, commits atomically, and cleans up after crashes."""

from __future__ import annotations

import os
import shutil

from cache.store import STAGING_PREFIX, ModelStore
from converters.pipeline import ensure_converted
from tests.tiny_models import ARCHS, Q, build_model, write_gguf


def tiny(tmp_path, name="tiny.gguf", seed=0):
    arch = ARCHS["qwen2"]
    return write_gguf(build_model(arch, seed=seed), arch, tmp_path / name, Q.Q8_0)


def test_same_content_elsewhere_is_a_hit(tmp_path, store):
    source = tiny(tmp_path)
    first = ensure_converted(source, store)
    moved = tmp_path / "elsewhere" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copy(source, moved)

    second = ensure_converted(moved, store)

    assert (first.cached, second.cached) == (False, True)
    assert second.entry.key == first.entry.key and len(store.entries()) == 1


def test_changed_content_is_a_new_entry(tmp_path, store):
    source = tiny(tmp_path)
    first = ensure_converted(source, store)
    tiny(tmp_path, seed=1)  # same path, different weights

    second = ensure_converted(source, store)

    assert second.cached is False and second.entry.key != first.entry.key
    assert second.entry.id != first.entry.id  # ids stay unique
    assert {e.key for e in store.entries()} == {first.entry.key, second.entry.key}


def test_leftover_staging_from_a_dead_process_is_removed(tmp_path, store):
    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    leftover = store.models_dir / f"{STAGING_PREFIX}abc-{dead_pid}"
    leftover.mkdir(parents=True)
    (leftover / "partial-00000.safetensors").write_bytes(b"half a tensor")
    live = store.models_dir / f"{STAGING_PREFIX}def-{os.getpid()}"
    live.mkdir()

    result = ensure_converted(tiny(tmp_path), store)

    assert not leftover.exists() and live.exists()
    assert [e.key for e in store.entries()] == [result.entry.key]


def test_index_ignores_entries_whose_folder_is_gone(tmp_path, store):
    result = ensure_converted(tiny(tmp_path), store)
    shutil.rmtree(result.path)
    assert store.entries() == []
    assert ModelStore(store.home).get(result.entry.id) is None


def test_a_changed_sidecar_config_is_a_new_entry(tmp_path, store):
    source = tiny(tmp_path)
    sidecar = tmp_path / "config.json"
    sidecar.write_text('{"note": 1}')
    first = ensure_converted(source, store)
    sidecar.write_text('{"note": 2}')

    second = ensure_converted(source, store)

    assert second.cached is False and second.entry.key != first.entry.key
