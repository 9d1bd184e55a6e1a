"""ONNX sources: weights mapped by the nodes that use them, MatMulNBits kept as MLX codes, fused
projections regrouped, external data read only from the model's folder, and damaged input refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.onnx_format import read
from converters.pipeline import ensure_converted
from errors import ConversionError
from tests.conftest import assert_refused_and_cache_untouched, home_with
from tests.exporters.onnx import EXAMPLE_IDS, export
from tests.tiny_models import IDS, build_hf_model, mlx_logits, torch_logits

MS_DOMAIN = "com.microsoft"



def load_graph(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"))


def save_single_file(proto: onnx.ModelProto, folder: Path) -> None:
    """Weights embedded in model.onnx, the external data file removed."""
    for tensor in proto.graph.initializer:
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.DEFAULT
    onnx.save_model(proto, str(folder / "model.onnx"))
    (folder / "model.onnx.data").unlink(missing_ok=True)


def save_external(proto: onnx.ModelProto, folder: Path) -> None:
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def initializer(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def weight_matmuls(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    names = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
    return [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in names]


def node_named(proto: onnx.ModelProto, suffix: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name.endswith(suffix))


def replace_node(proto: onnx.ModelProto, old: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
    nodes = list(proto.graph.node)
    at = nodes.index(old)
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes[:at] + new_nodes + nodes[at + 1 :])


# ---- MatMulNBits, written the way onnxruntime's quantiser writes it ----


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, values) uint8 codes -> (rows, bytes), lowest bits first, as MatMulNBits stores them."""
    per_byte = 8 // bits
    grouped = codes.reshape(codes.shape[0], -1, per_byte).astype(np.uint8)
    return np.bitwise_or.reduce([grouped[..., i] << (bits * i) for i in range(per_byte)], axis=0).astype(np.uint8)


def quantize_blocks(weights: np.ndarray, bits: int, block: int, fp16_scales: bool):
    """Asymmetric min/max quantisation of (N, K) weights in blocks of `block` along K (zero-padded)."""
    n, k = weights.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = weights
    grouped = padded.reshape(n, blocks, block)
    low, high = np.minimum(grouped.min(-1), 0), np.maximum(grouped.max(-1), 0)
    top = 2**bits - 1
    scales = ((high - low) / top).astype(np.float32)
    if fp16_scales:
        scales = scales.astype(np.float16).astype(np.float32)
    zero_points = np.clip(np.round(-low / scales), 0, top).astype(np.uint8)
    codes = np.clip(np.round(grouped / scales[..., None]) + zero_points[..., None], 0, top).astype(np.uint8)
    return codes.reshape(n, -1), scales, zero_points


def nbits_node(matmul: onnx.NodeProto, proto: onnx.ModelProto, bits: int, block: int, fp16_scales: bool):
    """A MatMulNBits node and its initializers for `matmul`'s (K, N) weight."""
    weight = numpy_helper.to_array(initializer(proto, matmul.input[1]))
    k, n = weight.shape
    codes, scales, zero_points = quantize_blocks(weight.T, bits, block, fp16_scales)
    base = matmul.input[1]
    blocks = scales.shape[1]
    packed_zero_points = pack(np.pad(zero_points, ((0, 0), (0, -blocks % (8 // bits)))), bits).reshape(-1)
    tensors = [
        numpy_helper.from_array(pack(codes, bits).reshape(n, blocks, -1), f"{base}_Q{bits}"),
        numpy_helper.from_array(scales.reshape(-1), f"{base}_scales"),
        numpy_helper.from_array(packed_zero_points, f"{base}_zero_points"),
    ]
    node = helper.make_node("MatMulNBits", [matmul.input[0], *(t.name for t in tensors)], list(matmul.output),
                            name=f"{matmul.name}_Q{bits}", domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block)
    return node, tensors


def quantize_model(folder: Path, bits: int, block: int, fp16_scales: bool) -> Path:
    """Every weight MatMul of the exported model replaced by MatMulNBits; a single-file model."""
    proto = load_graph(folder)
    for matmul in weight_matmuls(proto):
        node, tensors = nbits_node(matmul, proto, bits, block, fp16_scales)
        replace_node(proto, matmul, [node])
        proto.graph.initializer.remove(initializer(proto, matmul.input[1]))
        proto.graph.initializer.extend(tensors)
    proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    save_single_file(proto, folder)
    return folder


def onnxruntime_dequantized(proto: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """ONNX Runtime's own dequantisation of a MatMulNBits weight: the node applied to the identity."""
    k = helper.get_attribute_value(next(a for a in node.attribute if a.name == "K"))
    n = helper.get_attribute_value(next(a for a in node.attribute if a.name == "N"))
    alone = helper.make_node("MatMulNBits", ["A", *node.input[1:]], ["Y"], domain=MS_DOMAIN, **{
        a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph(
        [alone], "dequantize", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
        initializer=[initializer(proto, name) for name in node.input[1:] if name],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T


def onnxruntime_logits(folder: Path, ids: list[int]) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    return session.run(None, feed)[0][0]


def hf_module(node: onnx.NodeProto) -> str:
    """`/causal_lm/model/layers.0/mlp/up_proj/MatMul_Q4` -> `model.layers.0.mlp.up_proj`."""
    return ".".join(node.name.split("/")[2:-1])


@pytest.mark.parametrize(
    "bits, block, fp16_scales",
    [(4, 32, True), (4, 64, True), (8, 32, True), (4, 32, False)],
    ids=["int4-block32", "int4-block64", "int8-block32", "int4-block32-fp32-scales"],
)
def test_matmulnbits_keeps_the_codes(tmp_path, store, bits, block, fp16_scales):
    source = quantize_model(export(build_hf_model("llama"), "llama", tmp_path), bits, block, fp16_scales)
    proto = load_graph(source)

    result = ensure_converted(source, store)

    weights = mx.load(str(result.path / "model.safetensors"))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15  # 7 projections x 2 layers + lm_head
    for node in nodes:
        module = hf_module(node)
        packed = numpy_helper.to_array(initializer(proto, node.input[1]))
        assert np.array_equal(np.array(weights[f"{module}.weight"]).view(np.uint8), packed.reshape(packed.shape[0], -1))
        ours = np.array(mx.dequantize(weights[f"{module}.weight"], weights[f"{module}.scales"], weights[f"{module}.biases"],
                                      group_size=block, bits=bits))
        theirs = onnxruntime_dequantized(proto, node)
        if fp16_scales:
            assert np.array_equal(ours, theirs), module
        else:
            # MLX computes q*s + (-z*s), ONNX Runtime (q - z)*s: with 24-bit scales the two may round apart by an ulp.
            assert np.abs(ours - theirs).max() <= np.spacing(np.abs(theirs).max())
    assert result.entry.quantization == f"{bits}-bit affine, group {block}"
    assert np.abs(mlx_logits(result.path, EXAMPLE_IDS[0]) - onnxruntime_logits(source, EXAMPLE_IDS[0])).max() <= 1e-3


@pytest.mark.parametrize("block", [16, 128], ids=["block16", "block128-padded"])
def test_matmulnbits_blocks_mlx_cannot_hold_are_dequantised(tmp_path, store, block):
    """Block 16 is no MLX group size; block 128 over K = 64 pads its only block. Both become exact floats."""
    source = quantize_model(export(build_hf_model("qwen2"), "qwen2", tmp_path), 4, block, fp16_scales=False)
    proto = load_graph(source)

    result = ensure_converted(source, store)

    weights = mx.load(str(result.path / "model.safetensors"))
    for node in (n for n in proto.graph.node if n.op_type == "MatMulNBits"):
        module = hf_module(node)
        if f"{module}.scales" not in weights:
            assert np.array_equal(np.array(weights[f"{module}.weight"]), onnxruntime_dequantized(proto, node)), module
    kept = sorted(name for name in weights if name.endswith(".scales"))
    assert kept == ([] if block == 16 else sorted(f"model.layers.{i}.mlp.down_proj.scales" for i in (0, 1)))
    assert np.abs(mlx_logits(result.path, EXAMPLE_IDS[0]) - onnxruntime_logits(source, EXAMPLE_IDS[0])).max() <= 1e-3


def test_matmulnbits_with_too_few_codes_is_refused(tmp_path):
    source = quantize_model(export(build_hf_model("llama"), "llama", tmp_path), 4, 32, fp16_scales=True)
    proto = load_graph(source)
    codes = initializer(proto, node_named(proto, "layers.0/mlp/up_proj/MatMul_Q4").input[1])
    codes.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(codes)[:-1], codes.name))
    save_single_file(proto, source)

    with pytest.raises(ConversionError, match=r"MatMulNBits node .*up_proj/MatMul_Q4.*need 4096 values; the file is damaged"):
        read(source)


# ---- graphs other exporters write ----


def test_unfolded_graph_with_transposes_and_gemma_one_plus_norms(tmp_path, store):
    """Without constant folding, weights reach MatMul through Transpose and Gemma's norms as 1 + w."""
    model = build_hf_model("gemma3")
    source = export(model, "gemma3", tmp_path, fold_constants=False)
    proto = load_graph(source)
    assert any(n.op_type == "Transpose" and n.input[0].endswith("q_proj.weight") for n in proto.graph.node)

    result = ensure_converted(source, store)

    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


def fuse_matmuls(proto: onnx.ModelProto, suffixes: list[str], fused_name: str) -> None:
    """Replace MatMuls that share an input by one MatMul over their concatenated weights and a Split."""
    parts = [node_named(proto, suffix) for suffix in suffixes]
    weights = [numpy_helper.to_array(initializer(proto, p.input[1])) for p in parts]
    fused = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{fused_name}.weight")
    sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{fused_name}.sizes")
    matmul = helper.make_node("MatMul", [parts[0].input[0], fused.name], [f"{fused_name}.out"], name=f"{fused_name}/MatMul")
    split = helper.make_node("Split", [matmul.output[0], sizes.name], [p.output[0] for p in parts], axis=-1, name=f"{fused_name}/Split")
    replace_node(proto, parts[0], [matmul, split])
    for part in parts:
        if part in proto.graph.node:
            proto.graph.node.remove(part)
        proto.graph.initializer.remove(initializer(proto, part.input[1]))
    proto.graph.initializer.extend([fused, sizes])


def test_fused_qkv_is_split_for_a_module_with_separate_projections(tmp_path, store):
    """onnxruntime-genai's builder fuses q/k/v as `/model/layers.N/attn/qkv_proj`; mlx-lm's llama wants them apart."""
    model = build_hf_model("llama")
    source = export(model, "llama", tmp_path)
    proto = load_graph(source)
    for layer in (0, 1):
        projections = [f"layers.{layer}/self_attn/{p}_proj/MatMul" for p in "qkv"]
        fuse_matmuls(proto, projections, f"/model/layers.{layer}/attn/qkv_proj")
    save_external(proto, source)

    result = ensure_converted(source, store)

    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3
    assert np.abs(mlx_logits(result.path, EXAMPLE_IDS[0]) - onnxruntime_logits(source, EXAMPLE_IDS[0])).max() <= 1e-3


def split_matmul(proto: onnx.ModelProto, suffix: str, parts: list[tuple[str, int]]) -> None:
    """Replace one MatMul by one MatMul per group of output columns, joined by a Concat."""
    whole = node_named(proto, suffix)
    weight = numpy_helper.to_array(initializer(proto, whole.input[1]))
    bounds = np.cumsum([0] + [columns for _, columns in parts])
    nodes, tensors = [], []
    for (scope, _), start, end in zip(parts, bounds[:-1], bounds[1:]):
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, start:end]), f"{scope}.weight"))
        nodes.append(helper.make_node("MatMul", [whole.input[0], tensors[-1].name], [f"{scope}.out"], name=f"{scope}/MatMul"))
    nodes.append(helper.make_node("Concat", [n.output[0] for n in nodes], list(whole.output), axis=-1, name=f"{suffix}/Concat"))
    replace_node(proto, whole, nodes)
    proto.graph.initializer.remove(initializer(proto, whole.input[1]))
    proto.graph.initializer.extend(tensors)


def test_separate_projections_are_joined_for_phi3(tmp_path, store):
    model = build_hf_model("phi3")
    source = export(model, "phi3", tmp_path)
    proto = load_graph(source)
    for layer in (0, 1):
        scope = f"/model/layers.{layer}"
        split_matmul(proto, f"layers.{layer}/self_attn/qkv_proj/MatMul",
                     [(f"{scope}/self_attn/q_proj", 64), (f"{scope}/self_attn/k_proj", 32), (f"{scope}/self_attn/v_proj", 32)])
        split_matmul(proto, f"layers.{layer}/mlp/gate_up_proj/MatMul", [(f"{scope}/mlp/gate_proj", 128), (f"{scope}/mlp/up_proj", 128)])
    save_external(proto, source)

    result = ensure_converted(source, store)

    assert np.abs(mlx_logits(result.path) - torch_logits(model, IDS)).max() <= 1e-3


def test_tied_embedding_read_through_one_initializer(tmp_path, store):
    """Unfolded, a tied model's Gather and lm_head MatMul share one initializer; mlx-lm ties it again."""
    model = build_hf_model("gemma3")
    source = export(model, "gemma3", tmp_path, fold_constants=False)
    proto = load_graph(source)
    matrices = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] == model.config.vocab_size]
    assert len(matrices) == 1

    weights = mx.load(str(ensure_converted(source, store).path / "model.safetensors"))

    assert "lm_head.weight" not in weights
    assert np.array_equal(np.array(weights["model.embed_tokens.weight"]), model.model.embed_tokens.weight.detach().numpy())


# ---- files: the .onnx file, its folder, its external data ----


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory) -> Path:
    return export(build_hf_model("llama"), "llama", tmp_path_factory.mktemp("onnx"))


def copy_of(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def test_the_onnx_file_itself_converts_with_its_sidecars(llama_onnx, store):
    result = ensure_converted(llama_onnx / "model.onnx", store)

    assert result.entry.format == "onnx" and result.entry.id == llama_onnx.name  # "model" says nothing: the folder names it
    assert np.abs(mlx_logits(result.path) - torch_logits(build_hf_model("llama"), IDS)).max() <= 1e-3


def test_folder_with_several_graphs_and_no_model_onnx_is_refused(llama_onnx, tmp_path):
    source = copy_of(llama_onnx, tmp_path / "several")
    (source / "model.onnx").rename(source / "decoder.onnx")
    shutil.copy(source / "decoder.onnx", source / "encoder.onnx")

    with pytest.raises(ConversionError, match=r"several \.onnx files \(decoder\.onnx, encoder\.onnx\) and no model\.onnx"):
        read(source)


def point_external_data(folder: Path, location: str) -> None:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(folder / "model.onnx"))


@pytest.mark.parametrize("location", ["../stolen.data", "sub/../../stolen.data", "ABSOLUTE"])
def test_external_data_outside_the_folder_is_refused(llama_onnx, tmp_path, location):
    source = copy_of(llama_onnx, tmp_path / "model")
    stolen = shutil.copy(source / "model.onnx.data", tmp_path / "stolen.data")
    point_external_data(source, str(stolen) if location == "ABSOLUTE" else location)

    with pytest.raises(ConversionError, match="outside the model's folder; refusing to read it"):
        read(source)


# ---- damaged input through the real CLI ----


@pytest.fixture(scope="module")
def converted_home(llama_onnx, tmp_path_factory) -> Path:
    """An Impetus home holding one good conversion, copied by each test that must leave it untouched."""
    return home_with(llama_onnx, tmp_path_factory)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def rewrite(folder: Path, change) -> None:
    proto = load_graph(folder)
    change(proto)
    save_external(proto, folder)


def drop_initializer(proto: onnx.ModelProto, node_suffix: str) -> None:
    proto.graph.initializer.remove(initializer(proto, node_named(proto, node_suffix).input[1]))


def reshape_initializer(proto: onnx.ModelProto, node_suffix: str) -> None:
    tensor = initializer(proto, node_named(proto, node_suffix).input[1])
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).reshape(-1, 16), tensor.name))


def claim_scope_twice(proto: onnx.ModelProto) -> None:
    node_named(proto, "layers.1/self_attn/o_proj/MatMul").name = "/causal_lm/model/layers.1/self_attn/q_proj/MatMul_1"


def remove_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


K_PROJ = "model.layers.1.self_attn.k_proj.weight"


@pytest.mark.parametrize(
    "damage, named, expected",
    [
        (lambda f: truncate(f / "model.onnx"), "model.onnx", "unreadable ONNX model"),
        (lambda f: truncate(f / "model.onnx.data"), "model.onnx.data", "truncated"),
        (lambda f: point_external_data(f, "../elsewhere.data"), "model.onnx", "outside the model's folder"),
        (lambda f: (f / "model.onnx.data").unlink(), "model.onnx", "external data file 'model.onnx.data'"),
        (lambda f: (f / "config.json").unlink(), "bad-input", "no config.json"),
        (remove_tokenizer, "bad-input", "no tokenizer"),
        (lambda f: rewrite(f, lambda p: drop_initializer(p, "layers.1/self_attn/k_proj/MatMul")), "model.onnx",
         f"parameter '{K_PROJ}' not found"),
        (lambda f: rewrite(f, lambda p: reshape_initializer(p, "layers.1/self_attn/k_proj/MatMul")), "model.onnx",
         "has shape (16, 128), expected (32, 64)"),
        (lambda f: rewrite(f, claim_scope_twice), "model.onnx", "parameter 'model.layers.1.self_attn.q_proj.weight' found twice"),
    ],
    ids=["truncated-graph", "truncated-data", "data-outside", "data-missing", "missing-config", "missing-tokenizer",
         "missing-parameter", "wrong-shape", "duplicate-parameter"],
)
def test_damaged_input_is_one_line_error_and_cache_untouched(llama_onnx, converted_home, tmp_path, damage, named, expected):
    source = copy_of(llama_onnx, tmp_path / "bad-input")
    damage(source)
    assert_refused_and_cache_untouched(source, named, expected, converted_home, tmp_path / "home")
