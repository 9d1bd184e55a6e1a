"""What every converter hands to the shared writer."""

from __future__ import annotations

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

    @property
    def context_length(self) -> int | None:
        return self.config.get("max_position_embeddings")
