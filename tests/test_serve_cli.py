"""`python -m api`: a model path is converted on start; a bad model is a one-line error."""

from __future__ import annotations

import httpx

from tests.conftest import run_cli, running_server
from tests.tiny_models import ARCHS, Q, build_model, write_gguf


def test_serving_a_path_converts_it_into_an_empty_cache(tmp_path):
    arch = ARCHS["llama"]
    source = write_gguf(build_model(arch), arch, tmp_path / "Tiny-Llama.Q4_0.gguf", Q.Q4_0)
    with running_server(tmp_path / "home", str(source), tmp_path) as server:
        assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == ["tiny-llama-q4_0"]
        body = {"model": "tiny-llama-q4_0", "messages": [{"role": "user", "content": "the"}], "max_tokens": 3}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
        assert reply["usage"]["completion_tokens"] <= 3 and reply["model"] == "tiny-llama-q4_0"
    assert "Model ID:  tiny-llama-q4_0" in server.output() and f"{server.url}/v1" in server.output()


def test_unknown_model_is_a_one_line_error(tmp_path):
    result = run_cli("-m", "api", "--model", "no-such-model", home=tmp_path / "home")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: 'no-such-model' is neither a cached model id nor a model file or folder"]


def test_a_bad_batching_flag_is_a_usage_error(tmp_path):
    result = run_cli("-m", "api", "--max-sequences", "0", home=tmp_path / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-sequences: expected a whole number of at least 1, not '0'" in result.stderr


def test_a_bad_layout_setting_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPETUS_LAYOUT", "fast")
    result = run_cli("-m", "api", home=tmp_path / "home", timeout=60)  # a server that starts would run on
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: IMPETUS_LAYOUT must be one of auto, float32, as converted, not 'fast'"]
