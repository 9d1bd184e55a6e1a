"""Core ML ML Program written by coremltools' own converter from a torch.jit trace of the model.

Layout: `<dest>/<arch>-coreml/model.mlpackage`, with config.json and the tokenizer files in
`<arch>-coreml/`, the package's parent folder, which is where the converter looks for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tests.tiny_models import tiny_tokenizer

# Traced sequence lengths run from 1 to this; the causal masks are precomputed at this size.
MAX_LENGTH = 64

logging.getLogger("coremltools").setLevel(logging.ERROR)  # prediction-only warnings on Linux


class LogitsOfIds(torch.nn.Module):
    """input_ids -> logits, with precomputed 4-D additive masks so that the traced graph builds none."""

    def __init__(self, model, length: int = MAX_LENGTH):
        super().__init__()
        self.model = model
        config = model.config
        self.register_buffer("full_mask", additive_mask(length, None), persistent=False)
        self.sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
        if self.sliding:
            self.register_buffer("sliding_mask", additive_mask(length, config.sliding_window), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        mask = self.full_mask[:, :, :length, :length]
        if self.sliding:
            mask = {"full_attention": mask, "sliding_attention": self.sliding_mask[:, :, :length, :length]}
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def additive_mask(length: int, window: int | None) -> torch.Tensor:
    """0 where query i may attend to key j (j <= i, and i - j < window), the float32 minimum elsewhere."""
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    blocked = torch.full((length, length), torch.finfo(torch.float32).min)
    return torch.where(allowed, torch.zeros(()), blocked)[None, None]


def to_mlpackage(model, dest: Path, precision=None):
    """coremltools.convert of the traced model into an fp32 (or `precision`) ML Program saved at `dest`."""
    import coremltools as ct

    wrapper = LogitsOfIds(model).eval()
    example = torch.zeros((1, 8), dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example)
    length = ct.RangeDim(lower_bound=1, upper_bound=MAX_LENGTH, default=8)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32)],
        outputs=[ct.TensorType(name="logits")],
        convert_to="mlprogram",
        compute_precision=precision or ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS18,
    )
    mlmodel.save(str(dest))
    return mlmodel


def with_sidecars(model, folder: Path) -> Path:
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def export(model, arch: str, dest: Path) -> Path:
    folder = dest / f"{arch}-coreml"
    folder.mkdir(parents=True)
    package = folder / "model.mlpackage"
    to_mlpackage(model, package)
    with_sidecars(model, folder)
    return package
