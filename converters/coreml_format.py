"""Core ML reader: the weights of an ML Program (`.mlpackage`, or an `.mlmodel` with inline weights)
as HF-named MLX tensors, read with coremltools on any platform (nothing is compiled or predicted).

The package, its spec and blob files are read and checked in `coreml_program`, the weights the program
holds and how it uses them are found in `coreml_graph`, matched to the model's parameters in
`coreml_matching`, and written dense or as MLX affine codes in `coreml_weights`.

config.json and the tokenizer files are read from the folder that holds the package.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from converters.coreml_graph import weight_sources
from converters.coreml_matching import expected_parameters, match_parameters
from converters.coreml_program import check_blobs, load_program
from converters.coreml_weights import layer_quantization, planned_tensor
from converters.hf import copier, read_config, tokenizer_files
from converters.source import SourceModel

log = logging.getLogger(__name__)
# coremltools warns at import that prediction is unavailable off macOS; we never predict.
logging.getLogger("coremltools").setLevel(logging.ERROR)


def read(path: Path) -> SourceModel:
    folder = path.parent
    config = read_config(folder, path)
    save_tokenizer = copier(tokenizer_files(folder, path))
    program = load_program(path)
    check_blobs(program)
    expected = expected_parameters(config, path)
    placements = match_parameters(expected, weight_sources(program), path)
    tensors = [planned_tensor(program, placement) for placement in placements]
    log_compression(path, tensors)
    return SourceModel(
        architecture=config["model_type"],
        config=config,
        parameters=sum(math.prod(p.expected.shape) for p in placements),
        tensors=lambda: (item for planned in tensors for item in planned.make()),
        save_tokenizer=save_tokenizer,
        quantization=layer_quantization(tensors),
        source=path,
    )


def log_compression(path: Path, tensors: list) -> None:
    compressed = [t for t in tensors if t.placement.source.op.type != "const"]
    kept = sum(t.layout is not None for t in compressed)
    if compressed:
        log.info("%s: %d compressed weights, %d kept as MLX affine codes, %d dequantised (no exact MLX form)",
                 path, len(compressed), kept, len(compressed) - kept)
