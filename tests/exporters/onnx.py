"""ONNX folder written by `torch.onnx.export` (the TorchScript exporter: the dynamo one needs
onnxscript), weights of 1 KiB or more moved to external data, with config.json and tokenizer files."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from tests.tiny_models import tiny_tokenizer

OPSET = 17
EXAMPLE_IDS = [[1, 40, 77, 200, 259, 3]]
DATA_FILE = "model.onnx.data"


class CausalLMLogits(torch.nn.Module):
    """input_ids + attention_mask -> logits, without a KV cache: the graph the exporter traces."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids, attention_mask):
        return self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export(model, arch: str, dest: Path, fold_constants: bool = True) -> Path:
    folder = dest / f"{arch}-onnx"
    folder.mkdir(parents=True)
    onnx_path = folder / "model.onnx"
    export_graph(model, onnx_path, fold_constants)
    move_to_external_data(onnx_path)
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def export_graph(model, onnx_path: Path, fold_constants: bool) -> None:
    ids = torch.tensor(EXAMPLE_IDS)
    dynamic = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The tracer warns about every Python-level shape test in transformers; the graph is only read for weights.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            CausalLMLogits(model), (ids, torch.ones_like(ids)), str(onnx_path),
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "logits": dynamic},
            opset_version=OPSET, dynamo=False, do_constant_folding=fold_constants,
        )


def move_to_external_data(onnx_path: Path) -> None:
    proto = onnx.load(str(onnx_path))
    onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
