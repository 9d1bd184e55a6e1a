"""Conversion benchmark: Impetus against `mlx_lm.convert` on the same generated SafeTensors model.

    .venv/bin/python bench/convert_bench.py [--size-gb 1.1] [--dtype bfloat16] [--repeat 2]

Generates a random llama-style HF folder of at least `--size-gb` (sharded, with an index and the tiny
test tokenizer) in a temporary folder, then converts it with `convert.py --json` (fresh IMPETUS_HOME
each run, so never a cache hit) and with `python -m mlx_lm convert` (no quantisation, same dtype),
alternating, each in its own child process. Wall time and the child's peak RSS (from wait4) are
reported as a markdown table, best run of each. `--impetus-path stream` adds a tensor the index does
not list, so that Impetus cannot adopt whole shards and streams every tensor through its writer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Run as a script, only bench/ is on the path: the repository root goes first, for `bench.*` and the project.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import child_env, markdown_table, run_measured  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
HEAD_DIM = HIDDEN // HEADS


@dataclass(frozen=True)
class Run:
    tool: str
    seconds: float
    peak_rss_bytes: int
    output_bytes: int


# ---- the generated model ----


def layer_shapes() -> dict[str, tuple[int, ...]]:
    kv = KV_HEADS * HEAD_DIM
    return {
        "input_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "post_attention_layernorm.weight": (HIDDEN,),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }


def elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def model_shapes(target_bytes: int, itemsize: int) -> dict[str, tuple[int, ...]]:
    """Embedding, lm_head, final norm, and as many layers as it takes to reach `target_bytes`."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    per_layer = sum(map(elements, layer_shapes().values())) * itemsize
    fixed = sum(map(elements, shapes.values())) * itemsize
    layers = max(1, -(-(target_bytes - fixed) // per_layer))
    for index in range(layers):
        shapes.update({f"model.layers.{index}.{name}": shape for name, shape in layer_shapes().items()})
    return shapes


def llama_config(layers: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2,
    }


# An old rotary buffer that the index does not list: Impetus must then stream tensors, not adopt files.
UNINDEXED = "model.layers.0.self_attn.rotary_emb.inv_freq"


def generate_model(folder: Path, target_bytes: int, dtype_name: str, shard_bytes: int, unindexed: bool = False) -> int:
    """Write the random HF folder shard by shard (never more than one shard in memory); returns its size."""
    import mlx.core as mx

    from tests.tiny_models import tiny_tokenizer

    dtype = getattr(mx, dtype_name)
    shapes = model_shapes(target_bytes, dtype.size)
    groups = shard_groups(shapes, dtype.size, shard_bytes)
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        arrays = {name: (mx.random.normal(shapes[name]) * 0.02).astype(dtype) for name in names}
        weight_map.update(dict.fromkeys(names, file))
        if unindexed and number == 1:
            arrays[UNINDEXED] = mx.ones(HEAD_DIM // 2)
        mx.save_safetensors(str(folder / file), arrays, metadata={"format": "pt"})
    total = sum(elements(shape) for shape in shapes.values()) * dtype.size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    layers = 1 + max(int(name.split(".")[2]) for name in shapes if name.startswith("model.layers."))
    (folder / "config.json").write_text(json.dumps(llama_config(layers, dtype_name), indent=2))
    tiny_tokenizer().save_pretrained(str(folder))
    return total


def shard_groups(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = elements(shape) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


# ---- measuring one conversion in a child process ----


def measure(tool: str, command: list[str], env: dict, output: Path) -> Run:
    finished = run_measured(command, env)
    if finished.returncode != 0:
        raise SystemExit(f"{tool} failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
    check_output(tool, finished.stdout, output)
    return Run(tool, finished.seconds, finished.peak_rss_bytes, folder_bytes(output))


def check_output(tool: str, stdout: str, output: Path) -> None:
    if tool == "impetus" and json.loads(stdout)["cached"]:
        raise SystemExit("impetus answered from its cache; the benchmark needs a fresh IMPETUS_HOME")
    if not list(output.rglob("*.safetensors")):
        raise SystemExit(f"{tool} wrote no safetensors under {output}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_impetus(source: Path, scratch: Path) -> Run:
    home = scratch / "impetus-home"
    try:
        return measure("impetus", [sys.executable, "convert.py", str(source), "--json"], child_env(home), home / "models")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_mlx_lm(source: Path, scratch: Path, dtype: str) -> Run:
    output = scratch / "mlx-lm-out"
    command = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(output), "--dtype", dtype]
    try:
        return measure("mlx_lm.convert", command, child_env(), output)
    finally:
        shutil.rmtree(output, ignore_errors=True)


# ---- report ----


def table(best: dict[str, Run], source_bytes: int, dtype: str, impetus_path: str) -> str:
    ours, theirs = best["impetus"], best["mlx_lm.convert"]
    how = "shards adopted (copied)" if impetus_path == "adopt" else "tensors streamed and rewritten"
    rows = [[run.tool, f"{run.seconds:.2f}", f"{run.peak_rss_bytes / 1e6:,.0f}", f"{run.output_bytes / 1e9:.2f}"]
            for run in (ours, theirs)]
    rows.append(["impetus / mlx_lm", f"{ours.seconds / theirs.seconds:.2f}x",
                 f"{ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f}x", ""])
    header = ["tool", "wall time (s)", "peak RSS (MB)", "output (GB)"]
    return "\n".join([
        f"Source: random llama-style SafeTensors folder, {source_bytes / 1e9:.2f} GB, {dtype}; Impetus: {how}; "
        "best of each tool's runs.",
        "",
        markdown_table(header, rows, right=frozenset({1, 2, 3})),
    ])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.1, help="model size to generate (at least 1 GB)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-mb", type=int, default=512, help="source shard size")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each tool, alternating")
    parser.add_argument("--impetus-path", choices=["adopt", "stream"], default="adopt",
                        help="adopt: every shard is wanted whole, so Impetus copies it; stream: a tensor outside "
                             "the index makes Impetus read and rewrite each wanted tensor")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the temporary folder")
    parser.add_argument("--generate-into", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def generate_in_child(source: Path, args: argparse.Namespace) -> int:
    """Generate in a child process: a forked child starts with its parent's memory, so a parent that had
    held the generated weights would inflate every measured peak RSS."""
    command = [sys.executable, __file__, "--generate-into", str(source), "--size-gb", str(args.size_gb),
               "--dtype", args.dtype, "--shard-mb", str(args.shard_mb), "--impetus-path", args.impetus_path]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    args = parse_args()
    if args.size_gb < 1.0:
        raise SystemExit("--size-gb must be at least 1.0")
    if args.generate_into:
        target = int(args.size_gb * 1e9)
        print(generate_model(args.generate_into, target, args.dtype, args.shard_mb * 10**6, args.impetus_path == "stream"))
        return
    with tempfile.TemporaryDirectory(prefix="impetus-bench-", dir=args.workdir) as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "bench-llama"
        source.mkdir()
        source_bytes = generate_in_child(source, args)
        runs: list[Run] = []
        for _ in range(args.repeat):
            runs.append(run_impetus(source, scratch))
            runs.append(run_mlx_lm(source, scratch, args.dtype))
        for run in runs:
            print(f"{run.tool}: {run.seconds:.2f} s, peak RSS {run.peak_rss_bytes / 1e6:,.0f} MB", file=sys.stderr)
        best = {tool: min((r for r in runs if r.tool == tool), key=lambda r: r.seconds) for tool in ("impetus", "mlx_lm.convert")}
        print(table(best, source_bytes, args.dtype, args.impetus_path))


if __name__ == "__main__":
    main()
