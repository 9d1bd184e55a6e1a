"""Core ML sources beyond the equivalence table: compressed weights (block-wise int4 and per-channel
int8 kept as MLX codes, palettes and asymmetric int4 dequantised), programs whose weight names say
nothing, and broken packages through `python convert.py`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load

from cache.store import ModelStore
from converters.pipeline import ensure_converted
from tests.conftest import run_cli
from tests.exporters.coreml import export, to_mlpackage, with_sidecars
from tests.tiny_models import ARCHS, IDS, Q, build_hf_model, build_model, torch_logits, write_gguf

TOLERANCE = 1e-3
SPEC = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
# Small enough that every 2-D weight of the tiny models is compressed, large enough to spare the norms.
WEIGHT_THRESHOLD = 512


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_hf_model("llama")


@pytest.fixture(scope="module")
def llama_package(llama, tmp_path_factory) -> Path:
    """A tiny llama as an fp32 ML Program, with config.json and tokenizer beside it."""
    return export(llama, "llama", tmp_path_factory.mktemp("coreml"))


@pytest.fixture(scope="module")
def llama_package_fp16(llama, tmp_path_factory) -> Path:
    """The same as an fp16 ML Program, the precision Core ML models usually ship in."""
    import coremltools as ct

    folder = tmp_path_factory.mktemp("coreml-fp16")
    to_mlpackage(llama, folder / "model.mlpackage", ct.precision.FLOAT16)
    with_sidecars(llama, folder)
    return folder / "model.mlpackage"


def package_of(request, precision: str) -> Path:
    return request.getfixturevalue("llama_package" if precision == "fp32" else "llama_package_fp16")


def copied(package: Path, dest: Path) -> Path:
    """The package and its sidecar files, in a fresh folder."""
    shutil.copytree(package.parent, dest)
    return dest / package.name


def compressed(package: Path, dest: Path, compress) -> Path:
    """A copy of the package with its weights compressed by coremltools.optimize.coreml."""
    import coremltools as ct

    target = copied(package, dest)
    shutil.rmtree(target)
    compress(ct.models.MLModel(str(package), skip_model_load=True)).save(str(target))
    return target


def linear_quantized(dtype: str, granularity: str, mode: str = "linear_symmetric", block_size: int = 32):
    import coremltools.optimize.coreml as cto

    options = {"block_size": block_size} if granularity == "per_block" else {}
    op_config = cto.OpLinearQuantizerConfig(mode=mode, dtype=dtype, granularity=granularity,
                                            weight_threshold=WEIGHT_THRESHOLD, **options)
    return lambda mlmodel: cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op_config))


def palettized(mlmodel):
    import coremltools.optimize.coreml as cto

    op_config = cto.OpPalettizerConfig(nbits=4, mode="uniform", granularity="per_tensor", weight_threshold=WEIGHT_THRESHOLD)
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op_config))


def compression_ops(package: Path, model) -> dict[str, object]:
    """HF parameter name -> the constexpr op that holds it, in the program coremltools itself loads."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_program

    spec = ct.utils.load_spec(str(package / SPEC))
    program = load_program(spec, spec.specificationVersion, str(package / WEIGHTS.parent))
    ops = {op.outputs[0].name: op for op in program.functions["main"].operations if op.op_type.startswith("constexpr_")}
    names = {f"model_{name.replace('.', '_')}": name for name in model.state_dict()}
    bases = {mil: re.sub(r"(_to_fp16)?_(quantized|palettized)$", "", mil) for mil in ops}
    # The wrapper's mask buffers get compressed too; they are no parameter.
    return {names[bases[mil]]: op for mil, op in ops.items() if bases[mil] in names}


def converted(source: Path, store: ModelStore):
    result = ensure_converted(source, store)
    assert result.entry.format == "coreml"
    return result


def checkpoint(result) -> tuple[dict, dict[str, mx.array]]:
    config = json.loads((result.path / "config.json").read_text())
    return config, mx.load(str(result.path / "model.safetensors"))


def unpacked(weight: mx.array, bits: int) -> np.ndarray:
    words = np.array(weight).astype(np.uint64)
    shifts = np.arange(32 // bits, dtype=np.uint64) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.int64)


def dequantised_reference(model, ops: dict, dtype=torch.float32) -> np.ndarray:
    """torch logits with every compressed weight replaced by coremltools' own decompression of it,
    and the others rounded to the program's precision."""
    state = {name: t.to(dtype).float() for name, t in model.state_dict().items()}
    for name, op in ops.items():
        state[name] = torch.from_numpy(exact_values(op).astype(np.float32))
    reference = type(model)(model.config).eval()
    reference.load_state_dict(state)
    return torch_logits(reference, IDS)


def exact_values(op) -> np.ndarray:
    """A constexpr op's values without its output dtype's rounding (an fp16 program's dequantised
    weights are not fp16 numbers; MLX computes them in the activations' precision)."""
    if op.op_type != "constexpr_blockwise_shift_scale":
        return op.materialized_val_inference()
    offset = None if op.offset is None else op.offset.val.astype(np.float64)
    return op.decompress(op.data.val, op.scale.val.astype(np.float64), offset)


def mlx_logits(result) -> np.ndarray:
    model, _ = load(str(result.path))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([IDS]))[0])


# ---- compressed weights ----


def assert_codes_kept(op, parts: dict[str, mx.array], bits: int, group_size: int) -> None:
    """MLX's (weight, scales, biases) hold the op's codes, and the op's values."""
    codes, scale = op.data.val.astype(np.int64), op.scale.val
    q = unpacked(parts["weight"], bits)
    scales, biases = (np.array(parts[key]).repeat(group_size, axis=1) for key in ("scales", "biases"))
    assert np.array_equal(q - (1 << (bits - 1)), codes)
    # Exact arithmetic (float64 holds every product and sum here): MLX's scales * q + biases is
    # coremltools' scale * (code - offset), value for value.
    ours = scales.astype(np.float64) * q + biases.astype(np.float64)
    assert np.array_equal(ours, op.decompress(codes, scale.astype(np.float64), None))
    # MLX's own evaluation rounds scales * q before adding the biases: it may differ from coremltools'
    # by that one rounding, an ulp of the largest product in the group.
    mlx_values = np.array(mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=group_size, bits=bits))
    assert (np.abs(mlx_values - op.materialized_val_inference()) <= np.spacing(scales * (1 << bits))).all()


@pytest.mark.parametrize(
    "precision, dtype, granularity, bits, group_size",
    [("fp32", "int4", "per_block", 4, 32), ("fp16", "int4", "per_block", 4, 32), ("fp32", "int8", "per_channel", 8, 64)],
    ids=["int4-block32", "int4-block32-fp16", "int8-per-channel"],
)
def test_linear_quantized_weights_keep_their_codes(llama, request, tmp_path, store, precision, dtype, granularity, bits, group_size):
    package = compressed(package_of(request, precision), tmp_path / "q", linear_quantized(dtype, granularity))
    ops = compression_ops(package, llama)
    assert ops and all(op.op_type == "constexpr_blockwise_shift_scale" for op in ops.values())

    result = converted(package, store)
    config, weights = checkpoint(result)

    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (bits, group_size)
    for name, op in ops.items():
        module = name.removesuffix(".weight")
        # Per-channel scales span whole rows: each layer takes the largest MLX group its row length allows.
        layer_group = config["quantization"].get(module, config["quantization"])["group_size"]
        assert_codes_kept(op, {part: weights[f"{module}.{part}"] for part in ("weight", "scales", "biases")}, bits, layer_group)

    assert {str(v.dtype) for k, v in weights.items() if k.endswith("scales")} == {f"mlx.core.float{precision[2:]}"}
    reference = dequantised_reference(llama, ops, torch.float16 if precision == "fp16" else torch.float32)
    assert np.abs(mlx_logits(result) - reference).max() <= TOLERANCE


@pytest.mark.parametrize(
    "compress, op_type",
    [(palettized, "constexpr_lut_to_dense"), (linear_quantized("int4", "per_block", mode="linear"), "constexpr_blockwise_shift_scale")],
    ids=["palettized-4bit", "asymmetric-int4"],
)
def test_compressed_weights_without_an_exact_mlx_form_are_dequantised(llama, llama_package, tmp_path, store, compress, op_type):
    package = compressed(llama_package, tmp_path / "c", compress)
    ops = compression_ops(package, llama)
    assert ops and all(op.op_type == op_type for op in ops.values())

    result = converted(package, store)
    config, weights = checkpoint(result)

    assert "quantization" not in config
    for name, op in ops.items():
        assert np.array_equal(np.array(weights[name]), op.materialized_val_inference()), name
    assert np.abs(mlx_logits(result) - dequantised_reference(llama, ops)).max() <= TOLERANCE


def test_fp16_program_keeps_fp16_weights(llama, llama_package_fp16, store):
    _, weights = checkpoint(converted(llama_package_fp16, store))

    for name, tensor in llama.state_dict().items():
        if name in weights:
            assert weights[name].dtype == mx.float16
            assert np.array_equal(np.array(weights[name]), tensor.half().numpy()), name


# ---- weights found by how the program uses them ----


def anonymised(package: Path) -> Path:
    """The program with every constant renamed `c<n>` and the constants listed in reverse, so that
    nothing but the graph tells which weight is which."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package / SPEC))
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    operations = list(block.operations)
    constants = [op for op in operations if op.type == "const"]
    renames = {op.outputs[0].name: f"c{index}" for index, op in enumerate(constants)}
    for op in constants:
        op.attributes["name"].immediateValue.tensor.strings.values[0] = renames[op.outputs[0].name]
    for op in operations:
        for output in op.outputs:
            output.name = renames.get(output.name, output.name)
        for argument in op.inputs.values():
            for binding in argument.arguments:
                if binding.WhichOneof("binding") == "name":
                    binding.name = renames.get(binding.name, binding.name)
    del block.operations[:]
    block.operations.extend([*reversed(constants), *(op for op in operations if op.type != "const")])
    (package / SPEC).write_bytes(spec.SerializeToString())
    return package


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_weights_without_telling_names_are_placed_by_use(arch, tmp_path, store):
    model = build_hf_model(arch)
    package = anonymised(export(model, arch, tmp_path))
    assert "proj" not in (package / SPEC).read_bytes().decode("latin-1")

    result = converted(package, store)

    assert np.abs(mlx_logits(result) - torch_logits(model, IDS)).max() <= TOLERANCE


# ---- broken input through the command line ----


@pytest.fixture(scope="module")
def earlier_home(tmp_path_factory) -> Path:
    """An Impetus home holding one entry converted before (another model: the broken packages must miss)."""
    folder = tmp_path_factory.mktemp("earlier")
    earlier = write_gguf(build_model(ARCHS["llama"]), ARCHS["llama"], folder / "earlier.gguf", Q.Q8_0)
    assert run_cli("convert.py", str(earlier), home=folder / "home").returncode == 0
    return folder / "home"


def remove_manifest_item(package: Path, name: str) -> Path:
    manifest = json.loads((package / "Manifest.json").read_text())
    items = manifest["itemInfoEntries"]
    manifest["itemInfoEntries"] = {key: item for key, item in items.items() if item["name"] != name}
    (package / "Manifest.json").write_text(json.dumps(manifest))
    return package


def cut_weights(package: Path) -> Path:
    data = (package / WEIGHTS).read_bytes()
    (package / WEIGHTS).write_bytes(data[: len(data) // 2])
    return package


def damaged_weights(package: Path) -> Path:
    """weight.bin with the blob header of the embedding overwritten (the file keeps its size)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package / SPEC))
    function = spec.mlProgram.functions["main"]
    embedding = next(op for op in function.block_specializations[function.opset].operations
                     if op.outputs[0].name.endswith("embed_tokens_weight"))
    start = embedding.attributes["val"].blobFileValue.offset
    data = bytearray((package / WEIGHTS).read_bytes())
    data[start : start + 64] = b"\xff" * 64
    (package / WEIGHTS).write_bytes(bytes(data))
    return package


def lone_spec(package: Path) -> Path:
    lone = package.parent / "model.mlmodel"
    shutil.copyfile(package / SPEC, lone)
    return lone


def neural_network(package: Path) -> Path:
    """An old-style neural-network .mlmodel (one inner product), built with coremltools' own builder."""
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", datatypes.Array(64))], [("y", datatypes.Array(8))])
    builder.add_inner_product("fc", W=np.ones((8, 64), np.float32), b=None, input_channels=64, output_channels=8,
                              has_bias=False, input_name="x", output_name="y")
    ct.utils.save_spec(builder.spec, str(package.parent / "network.mlmodel"))
    return package.parent / "network.mlmodel"


def without(package: Path, *names: str) -> Path:
    for name in names:
        (package.parent / name).unlink()
    return package


def other_config(package: Path) -> Path:
    config = json.loads((package.parent / "config.json").read_text())
    (package.parent / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    return package


@pytest.mark.parametrize(
    "make_bad, named, problem",
    [
        (cut_weights, "weight.bin", "truncated"),
        (damaged_weights, "weight.bin", "cannot read"),
        (lambda p: remove_manifest_item(p, "model.mlmodel"), "Manifest.json", "no root model"),
        (lambda p: remove_manifest_item(p, "weights"), "Manifest.json", "no weights folder"),
        (lambda p: (p / SPEC).write_bytes(b"\x08\x09junk" * 50) and p, "model.mlmodel", "not a readable Core ML model spec"),
        (lone_spec, "model.mlmodel", "lone .mlmodel"),
        (neural_network, "network.mlmodel", "not an ML Program"),
        (lambda p: without(p, "config.json"), "config.json", "no config.json"),
        (lambda p: without(p, "tokenizer.json", "tokenizer_config.json"), "tokenizer", "no tokenizer"),
        (other_config, "config.json", "do not describe the same model"),
    ],
    ids=["weights-truncated", "weights-damaged", "manifest-no-root", "manifest-no-weights", "spec-garbage",
         "lone-mlmodel", "neural-network", "no-config", "no-tokenizer", "config-of-another-model"],
)
def test_broken_package_is_one_line_error_and_cache_untouched(llama_package, earlier_home, tmp_path, make_bad, named, problem):
    home = shutil.copytree(earlier_home, tmp_path / "home")
    before = ModelStore(home).entries()
    bad = make_bad(copied(llama_package, tmp_path / "bad"))

    result = run_cli("convert.py", str(bad), home=home)

    assert result.returncode != 0
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0] and problem in errors[0], result.stderr
    store = ModelStore(home)
    assert store.entries() == before
    assert sorted(p.name for p in store.models_dir.iterdir()) == [before[0].key]
