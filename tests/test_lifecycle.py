"""Models named by path are converted on first request; several stay resident within a budget;
idle ones unload; uploads are checked and converted. A real server on tiny GGUF models."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from runtime.cpu.blas import allocator_path
from tests.conftest import running_server
from tests.tiny_models import ARCHS, Q, build_model, write_gguf

HELLO = [{"role": "user", "content": "the"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny llama GGUFs (each different) in one model root."""
    root = tmp_path_factory.mktemp("models")
    arch = ARCHS["llama"]
    paths = {name: write_gguf(build_model(arch, seed=seed), arch, root / f"{name}.gguf", Q.Q4_0)
             for seed, name in enumerate(["tiny-a", "tiny-b", "tiny-c", "tiny-d", "tiny-e"])}
    paths["big"] = write_gguf(build_model(arch, seed=9), arch, root / "big.gguf", Q.F32)
    return root, paths


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def server(models, home, tmp_path_factory):
    root, paths = models
    env = {"IMPETUS_MODEL_ROOTS": str(root), "IMPETUS_UPLOAD_MAX_BYTES": "200000", "IMPETUS_KEEP_ALIVE": "-1",
           "IMPETUS_MAX_SEQUENCES": "3", "IMPETUS_PREFILL_CHUNK": "256"}
    with running_server(home, str(paths["tiny-a"]), tmp_path_factory.mktemp("log"), **env) as running:
        yield running.url


def chat(server: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 2, **extra}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300)


def status(server: str) -> dict:
    return httpx.get(f"{server}/api/models/status").json()


def resident_ids(server: str) -> list[str]:
    return [r["id"] for r in status(server)["resident"]]


def test_first_request_for_a_path_converts_it_with_keepalives(server, models):
    path = str(models[1]["tiny-b"])
    body = {"model": path, "messages": HELLO, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=300) as response:
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert response.status_code == 200 and comments, lines[:5]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    converted = status(server)["conversions"]["converted"]

    again = chat(server, path)
    assert again.status_code == 200 and again.json()["model"] == "tiny-b"
    assert status(server)["conversions"]["converted"] == converted  # served from the cache


def test_concurrent_first_requests_share_one_conversion(server, models):
    path = str(models[1]["tiny-c"])
    before = status(server)["conversions"]

    async def both():
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": path, "messages": HELLO, "max_tokens": 2}
            return await asyncio.gather(*(client.post(f"{server}/v1/chat/completions", json=body) for _ in range(2)))

    replies = asyncio.run(both())
    after = status(server)["conversions"]
    assert [r.status_code for r in replies] == [200, 200]
    assert after["started"] - before["started"] == 1 and after["converted"] - before["converted"] == 1


def test_paths_outside_the_model_roots_are_refused(server, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    reply = chat(server, str(outside))
    assert reply.status_code == 404 and "outside the model roots" in reply.json()["error"]["message"]


def test_keep_alive_zero_unloads_after_the_request(server, models):
    assert chat(server, str(models[1]["tiny-b"]), keep_alive=0).status_code == 200
    assert "tiny-b" not in resident_ids(server)


def test_keep_alive_duration_unloads_when_idle(server, models):
    assert chat(server, str(models[1]["tiny-c"]), keep_alive="1s").status_code == 200
    assert "tiny-c" in resident_ids(server)
    deadline = time.monotonic() + 15
    while "tiny-c" in resident_ids(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "tiny-c" not in resident_ids(server)


def test_pinned_model_survives_while_others_are_evicted_least_recently_used(server, models):
    for name in ("tiny-d", "tiny-e"):  # convert them
        assert chat(server, str(models[1][name])).status_code == 200
    pinned = httpx.post(f"{server}/api/models/switch", json={"model": "tiny-a", "pin": True}, timeout=120)
    assert pinned.status_code == 200
    one_model = max(r["bytes"] for r in status(server)["resident"])
    httpx.post(f"{server}/api/models/budget", json={"bytes": 2 * one_model + one_model // 2})
    for name in ("tiny-b", "tiny-d", "tiny-e"):
        assert chat(server, name).status_code == 200
    assert sorted(resident_ids(server)) == ["tiny-a", "tiny-e"]


def test_upload_rejects_oversized_and_non_model_files_and_serves_a_good_one(server, models):
    big = models[1]["big"]
    reply = httpx.post(f"{server}/api/models/upload", files={"file": (big.name, big.read_bytes())})
    assert reply.status_code == 413 and "limit" in reply.json()["error"]["message"]

    reply = httpx.post(f"{server}/api/models/upload", files={"file": ("notes.txt", b"hello, not a model\n")})
    assert reply.status_code == 400 and "not a model" in reply.json()["error"]["message"]

    arch = ARCHS["llama"]
    good = write_gguf(build_model(arch, seed=21), arch, models[0].parent / "Uploaded-Tiny.Q4_0.gguf", Q.Q4_0)
    reply = httpx.post(f"{server}/api/models/upload", files={"file": (good.name, good.read_bytes())}, timeout=300)
    assert reply.status_code == 200 and reply.json()["id"] == "uploaded-tiny-q4_0"
    listed = [m["id"] for m in httpx.get(f"{server}/api/models/list").json()["data"]]
    assert "uploaded-tiny-q4_0" in listed
    assert chat(server, "uploaded-tiny-q4_0").status_code == 200


def test_system_optimization_reports_hardware_and_choices(server):
    report = httpx.get(f"{server}/api/system/optimization").json()
    assert report["hardware"]["memory"]["total_bytes"] > 0 and report["hardware"]["blas"] == "openblas"
    assert report["conversion"]["budget_bytes"] > 0
    assert report["runtime"]["resident_budget_bytes"] > 0 and report["runtime"]["layout"] in ("float32", "as converted")


def test_the_server_measures_its_layouts_and_threads_on_the_fast_blas(server):
    """Relaunched with OpenBLAS and the forwarding library in front; each layout and thread count measured."""
    runtime = httpx.get(f"{server}/api/system/optimization").json()["runtime"]
    tuning, blas = runtime["tuning"], runtime["blas"]
    assert blas["single_row_gemv"] and Path(blas["sgemm_from"]).name.startswith("libimpetus_gemv")
    assert blas["allocator"] == ("tcmalloc" if allocator_path() else "glibc")
    assert tuning["reason"] in ("measured", "remembered")
    measured = {(m["layout"], m["threads"]) for m in tuning["measurements"]}
    cores = len(os.sched_getaffinity(0))
    assert ("as converted", None) in measured and {("float32", 1), ("float32", cores)} <= measured
    assert (tuning["layout"], tuning["threads"]) in measured | {("as converted", None)}
    assert runtime["batching"] == {"max_sequences": 3, "prefill_chunk": 256}
    # MLX runs on the CPU here
    assert runtime["cpu_fast_ops"] == ["rope", "rms_norm", "scaled_dot_product_attention", "logsumexp", "swiglu"]


def test_model_configuration_file_names_a_model(server, home, tmp_path):
    arch = ARCHS["llama"]
    source = write_gguf(build_model(arch, seed=33), arch, tmp_path / "configured.gguf", Q.Q4_0)
    folder = home / "config" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.yaml").write_text(f"model_id: my-tiny\ndisplay_name: My tiny model\npath: {source}\n")

    reply = chat(server, "my-tiny")

    assert reply.status_code == 200 and reply.json()["model"] == "configured"


def test_a_loaded_model_is_leased_so_the_cache_cap_cannot_evict_it(server, home):
    from cache.store import ModelStore

    loaded = status(server)["model"]
    store = ModelStore(home, max_bytes=0)
    assert store.in_use(store.get(loaded).key)


def test_unreadable_keep_alive_is_a_clear_400(server):
    reply = chat(server, "tiny-a", keep_alive="soon")
    assert reply.status_code == 400 and "keep_alive" in reply.json()["error"]["message"]
