"""What every converter hands to the shared writer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

# (HF tensor name, mlx.core.array); quantised layers come as `.weight`, `.scales`, `.biases`.
Tensors = Iterator[tuple[str, "object"]]


@dataclass
class SourceModel:
    architecture: str
    config: dict
    parameters: int
    tensors: Callable[[], Tensors]
    save_tokenizer: Callable[[Path], None]
    # MLX quantisation block for config.json: {"group_size", "bits", "<layer path>": {...}}.
    quantization: dict | None = None
    notes: list[str] = field(default_factory=list)
    # The file or folder the user gave, so that shared checks can name it in their errors.
    source: Path | None = None
    # Safetensors files that `mlx_lm.load` reads as they are (MLX checkpoints, HF shards wanted whole):
    # the writer then copies them instead of rewriting `tensors()`.
    adopt_files: Callable[[], list[Path]] | None = None

    @property
    def context_length(self) -> int | None:
        return self.config.get("max_position_embeddings")

    @property
    def label(self) -> str:
        """How errors name this model: its source path when known."""
        return str(self.source) if self.source else f"the {self.architecture} model"


def quantization_block(layers: dict[str, dict], default: dict | None = None) -> dict | None:
    """MLX's `quantization` config for the layers stored quantised ({"group_size", "bits", "mode"} each):
    `default` (else the most common setting), and an override for every layer stored otherwise."""
    if not layers:
        return None
    if default is None:
        default = dict(Counter(tuple(sorted(q.items())) for q in layers.values()).most_common(1)[0][0])
    return {**default, **{module: q for module, q in layers.items() if q != default}}
