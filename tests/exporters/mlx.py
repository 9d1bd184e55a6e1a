"""MLX folder written by mlx-lm's own converter (`mlx_lm.convert`) from the transformers folder, in fp32."""

from pathlib import Path

from mlx_lm import convert

from tests.tiny_models import save_hf_folder


def export(model, arch: str, dest: Path, **convert_options) -> Path:
    hf_folder = save_hf_folder(model, dest / f"{arch}-hf")
    mlx_folder = dest / f"{arch}-mlx"
    convert(str(hf_folder), str(mlx_folder), dtype="float32", **convert_options)
    return mlx_folder
