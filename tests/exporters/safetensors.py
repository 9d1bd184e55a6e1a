"""HF folder written by transformers' own `save_pretrained` (safetensors)."""

from pathlib import Path

from tests.tiny_models import save_hf_folder


def export(model, arch: str, dest: Path) -> Path:
    return save_hf_folder(model, dest / f"{arch}-hf")
