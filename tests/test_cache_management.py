"""Sizing and cache management through the real CLI and real processes: forced and planned quantisation,
`--plan`, `--list`, `--remove`, `--verify`, the size cap with leases, one conversion for two concurrent
processes, and `kill -9` mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load

from cache.fingerprint import changed_files
from cache.store import STAGING_PREFIX, ModelStore
from converters.pipeline import ensure_converted, plan_conversion
from converters.planner import Layout, Plan
from tests.conftest import ROOT, run_cli
from tests.tiny_models import ARCHS, IDS, Q, build_hf_model, build_model, save_hf_folder, tiny_tokenizer, torch_logits, write_gguf



@pytest.fixture
def fp32_folder(tmp_path) -> Path:
    return save_hf_folder(build_hf_model("llama"), tmp_path / "tiny-llama")


def converted(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mlx_logits(path: str) -> np.ndarray:
    model, _ = load(path)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([IDS]))[0])


def dequantised_torch_logits(hf_model, checkpoint: Path) -> np.ndarray:
    """torch logits with every weight replaced by what the MLX checkpoint holds for it."""
    arrays = mx.load(str(checkpoint / "model.safetensors"))
    config = json.loads((checkpoint / "config.json").read_text())["quantization"]
    state = {}
    for name in hf_model.state_dict():
        module = name.rsplit(".", 1)[0]
        if f"{module}.scales" in arrays:
            setting = config.get(module, config)
            weights = mx.dequantize(arrays[name], arrays[f"{module}.scales"], arrays[f"{module}.biases"],
                                    group_size=setting["group_size"], bits=setting["bits"])
        else:
            weights = arrays[name]
        state[name] = torch.from_numpy(np.array(weights.astype(mx.float32)))
    reference = type(hf_model)(hf_model.config).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        return reference(torch.tensor([IDS])).logits[0].numpy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_forced_4_bits_of_an_fp32_model(fp32_folder, tmp_path):
    hf_model = build_hf_model("llama")
    made = converted(run_cli("convert.py", str(fp32_folder), "--bits", "4", "--dtype", "float32", "--json", home=tmp_path / "home"))
    checkpoint = Path(made["path"])
    config = json.loads((checkpoint / "config.json").read_text())

    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"} == config["quantization_config"]
    arrays = mx.load(str(checkpoint / "model.safetensors"))
    assert arrays["model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
    assert arrays["model.layers.0.mlp.down_proj.weight"].shape == (64, 128 * 4 // 32)
    assert made["quantization"].startswith("4-bit affine, group 64") and made["id"] == "tiny-llama-q4"

    logits = mlx_logits(made["path"])
    # Exactly the 4-bit weights it holds, and loosely the fp32 model it came from.
    assert np.abs(logits - dequantised_torch_logits(hf_model, checkpoint)).max() <= 1e-3
    assert correlation(logits, torch_logits(hf_model, IDS)) > 0.8
    # The planner's estimate of the weights is what was written (norms aside, 1 % of this tiny model).
    planned = plan_conversion(fp32_folder, {"bits": 4, "dtype": "float32"})
    written = sum(array.nbytes for array in arrays.values())
    assert abs(written - planned.weight_bytes) / written < 0.03


def test_eight_bits_in_bfloat16_is_close_to_torch(fp32_folder, tmp_path):
    made = converted(run_cli("convert.py", str(fp32_folder), "--bits", "8", "--json", home=tmp_path / "home"))
    config = json.loads((Path(made["path"]) / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    assert mx.load(str(Path(made["path"]) / "model.safetensors"))["model.norm.weight"].dtype == mx.bfloat16
    logits = mlx_logits(made["path"])
    reference = torch_logits(build_hf_model("llama"), IDS)
    assert correlation(logits, reference) > 0.99 and np.abs(logits - reference).max() < 0.5


def test_planned_mixed_layout_when_memory_is_short(fp32_folder, store, monkeypatch):
    """A machine just big enough for the 4/6-bit mixed layout gets it, and mlx-lm loads its per-layer widths."""
    lossless = plan_conversion(fp32_folder)
    assert lossless.layout.keeps_source and lossless.options() == {}
    mixed = Plan(Layout(bits=4, high_bits=6, dtype="bfloat16"), lossless.source, lossless.shape, lossless.budget, lossless.context)
    monkeypatch.setenv("IMPETUS_MEMORY_BYTES", str(int(mixed.total_bytes / 0.75) + 8))

    result = ensure_converted(fp32_folder, store)

    assert result.entry.options == {"bits": 4, "group_size": 64, "high_bits": 6, "dtype": "bfloat16"}
    config = json.loads((result.path / "config.json").read_text())["quantization"]
    # Of two layers, the last is in llama.cpp's "more bits" set (the last eighth), the first is not.
    assert config["bits"] == 4 and config["lm_head"]["bits"] == 6 and config["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert "model.layers.0.mlp.down_proj" not in config and "model.layers.1.mlp.up_proj" not in config  # default 4 bits
    model, _ = load(str(result.path))
    layers = model.model.layers
    assert (model.lm_head.bits, layers[1].self_attn.v_proj.bits, layers[0].self_attn.v_proj.bits, layers[1].mlp.up_proj.bits) == (6, 6, 4, 4)
    logits = mlx_logits(str(result.path))
    assert correlation(logits, torch_logits(build_hf_model("llama"), IDS)) > 0.8
    # The same request again is a cache hit, found without planning.
    assert ensure_converted(fp32_folder, store).cached is True


def test_a_quantised_source_is_narrowed_never_widened(tmp_path, store):
    """Q8_0 GGUF: `--bits 8` keeps it bit for bit; `--bits 4` dequantises and requantises it to 4 bits."""
    source = gguf_source(tmp_path, "q8.gguf", 0)
    kept = ensure_converted(source, store, {"bits": 8})
    assert kept.entry.options == {} and kept.entry.quantization.startswith("8-bit")
    assert ensure_converted(source, store).entry.key == kept.entry.key  # the same as without --bits

    narrowed = ensure_converted(source, store, {"bits": 4})

    config = json.loads((narrowed.path / "config.json").read_text())["quantization"]
    assert (config["bits"], config["group_size"]) == (4, 64) and narrowed.entry.id == "q8-q4"
    assert mx.load(str(narrowed.path / "model.safetensors"))["model.layers.0.mlp.up_proj.scales"].shape == (128, 1)
    assert correlation(mlx_logits(str(narrowed.path)), mlx_logits(str(kept.path))) > 0.8


def test_plan_prints_the_plan_without_converting(fp32_folder, tmp_path):
    home = tmp_path / "home"
    text = run_cli("convert.py", str(fp32_folder), "--plan", home=home)
    assert text.returncode == 0, text.stderr
    assert "chosen: as the source (32-bit floats)" in text.stdout and "budget:" in text.stdout

    forced = run_cli("convert.py", str(fp32_folder), "--plan", "--bits", "3", "--json", home=home)
    plan = json.loads(forced.stdout)
    assert (plan["bits"], plan["forced"], plan["options"]["bits"]) == (3, True, 3)
    assert plan["total_bytes"] == plan["weight_bytes"] + plan["kv_cache_bytes"] + plan["overhead_bytes"]
    assert not home.exists()  # nothing converted, nothing cached

    seven = run_cli("convert.py", str(fp32_folder), "--plan", "--bits", "7", home=home)
    assert seven.returncode == 1 and "error: " in seven.stderr and "2, 3, 4, 5, 6 or 8 bits" in seven.stderr


def gguf_source(tmp_path: Path, name: str, seed: int) -> Path:
    arch = ARCHS["qwen2"]
    return write_gguf(build_model(arch, seed=seed), arch, tmp_path / name, Q.Q8_0)


def test_list_verify_remove(tmp_path):
    home = tmp_path / "cache"
    made = converted(run_cli("convert.py", str(gguf_source(tmp_path, "a.gguf", 0)), "--json", "--cache-dir", str(home), home=tmp_path / "unused"))
    assert Path(made["path"]).parent == home / "models" and not (tmp_path / "unused").exists()

    listed = converted(run_cli("convert.py", "--list", "--json", "--cache-dir", str(home), home=tmp_path / "unused"))
    assert [(row["id"], row["in_use_by"]) for row in listed] == [(made["id"], [])]

    ok = run_cli("convert.py", "--verify", made["id"], "--cache-dir", str(home), home=tmp_path / "unused")
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok: {made['id']}"), ok.stderr

    config = Path(made["path"]) / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "tampered": true}', 1))
    bad = run_cli("convert.py", "--verify", made["id"], "--cache-dir", str(home), home=tmp_path / "unused")
    assert bad.returncode == 1 and "tokenizer_config.json: changed since it was converted" in bad.stderr

    removed = run_cli("convert.py", "--remove", made["id"], "--cache-dir", str(home), home=tmp_path / "unused")
    assert removed.returncode == 0 and f"removed {made['id']}" in removed.stdout
    assert not Path(made["path"]).exists() and ModelStore(home).entries() == []
    again = run_cli("convert.py", "--remove", made["id"], "--cache-dir", str(home), home=tmp_path / "unused")
    assert again.returncode == 1 and "--list" in again.stderr


def test_remove_is_refused_while_a_process_holds_a_lease(tmp_path, store):
    entry = ensure_converted(gguf_source(tmp_path, "a.gguf", 0), store).entry
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.mark_in_use(entry.key, pid=holder.pid)
        refused = run_cli("convert.py", "--remove", entry.id, home=store.home)
        assert refused.returncode == 1 and f"in use by process {holder.pid}" in refused.stderr
        assert store.get(entry.key) is not None
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone, so its lease no longer counts.
    assert run_cli("convert.py", "--remove", entry.id, home=store.home).returncode == 0


def test_size_cap_evicts_least_recently_used_entries_not_in_use(tmp_path):
    uncapped = ModelStore(tmp_path / "home", max_bytes=0)
    a, b = (ensure_converted(gguf_source(tmp_path, f"{n}.gguf", seed), uncapped).entry for seed, n in enumerate("ab"))
    capped = ModelStore(tmp_path / "home", max_bytes=a.size_bytes + b.size_bytes + 1000)

    with capped.lease(a.key):  # a is the least recently used, but in use
        c = ensure_converted(gguf_source(tmp_path, "c.gguf", 2), capped).entry
        assert {e.key for e in capped.entries()} == {a.key, c.key}  # b evicted, not a
    assert not (capped.models_dir / b.key).exists()

    capped.touch(c.key)
    d = ensure_converted(gguf_source(tmp_path, "d.gguf", 3), capped).entry
    assert {e.key for e in capped.entries()} == {c.key, d.key}  # a, released and oldest, evicted


def test_two_concurrent_processes_convert_once(fp32_folder, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "IMPETUS_HOME": str(home)}
    command = [sys.executable, "convert.py", str(fp32_folder), "--bits", "4", "--json"]
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]

    assert all(process.returncode == 0 for process in processes), outputs
    results = [json.loads(out) for out, _ in outputs]
    conversions = sum(err.count("converting ") for _, err in outputs)
    assert conversions == 1 and sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] and len(ModelStore(home).entries()) == 1


# ---- kill -9 while writing ----

BIG = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=8192)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """A ~60 M-parameter fp32 llama folder (~240 MB), so that a conversion takes long enough to kill."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("big") / "big-llama"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({name: rng.standard_normal(shape, dtype=np.float32) * 0.02 for name, shape in big_shapes().items()},
              str(folder / "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32", **BIG}
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(folder)
    return folder


def big_shapes() -> dict[str, tuple[int, ...]]:
    hidden, inner, vocab = BIG["hidden_size"], BIG["intermediate_size"], BIG["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(BIG["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,)}
        shapes |= {f"{layer}.self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"}
        shapes |= {f"{layer}.mlp.gate_proj.weight": (inner, hidden), f"{layer}.mlp.up_proj.weight": (inner, hidden),
                   f"{layer}.mlp.down_proj.weight": (hidden, inner)}
    return shapes


def wait_for_staging(store: ModelStore, process: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(store.models_dir.glob(f"{STAGING_PREFIX}*-{process.pid}")):
            return True
        time.sleep(0.01)
    return False


def assert_index_lists_only_complete_entries(store: ModelStore) -> None:
    for entry in store.entries():
        assert changed_files(store.checkpoint_path(entry), entry.files) == []


def test_kill_9_while_writing_never_leaves_a_broken_entry(big_folder, tmp_path):
    home = tmp_path / "home"
    store = ModelStore(home)
    env = {**os.environ, "IMPETUS_HOME": str(home)}
    command = [sys.executable, "convert.py", str(big_folder), "--bits", "4", "--json"]
    rng = random.Random(0)
    for _ in range(3):
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_staging(store, process), "the conversion never started writing"
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert store.entries() == []  # killed mid-write: nothing listed
        assert_index_lists_only_complete_entries(store)
        # Only this kill's staging folder is left: each run cleans what the previous kill left.
        leftovers = [path.name for path in store.models_dir.glob(f"{STAGING_PREFIX}*")]
        assert len(leftovers) == 1 and leftovers[0].endswith(f"-{process.pid}")

    made = converted(run_cli("convert.py", str(big_folder), "--bits", "4", "--json", home=home))

    assert not list(store.models_dir.glob(f"{STAGING_PREFIX}*"))  # cleaned by the next run
    assert [e.key for e in store.entries()] == [made["key"]]
    assert_index_lists_only_complete_entries(store)
    verified = run_cli("convert.py", "--verify", made["id"], home=home)
    assert verified.returncode == 0, verified.stderr
