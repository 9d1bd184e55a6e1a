"""`convert.py --verify`: a cached checkpoint is what was committed (sha256 of every file), mlx-lm still
loads it, and it passes the numeric checks every new conversion passes (`cache/numerics.py`), which
entries converted before those checks existed never did."""

from __future__ import annotations

from cache.fingerprint import changed_files
from cache.numerics import FiniteCheck, judged_probe
from cache.store import ModelStore
from errors import BadWeightsError, ImpetusError

# What mlx-lm and safetensors raise on damaged or inconsistent checkpoint files.
LOAD_ERRORS = (ValueError, RuntimeError, OSError, KeyError)


class VerificationError(ImpetusError):
    """A cached checkpoint no longer matches what was committed, or does not load."""


def verify_entry(store: ModelStore, name: str) -> dict:
    from mlx.utils import tree_flatten

    entry = store.require(name)
    path = store.checkpoint_path(entry)
    problems = changed_files(path, entry.files)
    if problems:
        raise VerificationError(f"'{entry.id}': {'; '.join(problems)}; remove it with --remove {entry.id} and convert it again")
    model, config = loaded(path, entry.id)
    advice = (f"It was converted from a damaged source: remove it with --remove {entry.id}, "
              "download the source again and convert it")
    try:
        weights = FiniteCheck(f"'{entry.id}'", advice=advice)
        weights.scan(tree_flatten(model.parameters()))
        probe = judged_probe(model, config, f"'{entry.id}'", allow_bad=False, advice=advice)
    except BadWeightsError as exc:
        raise VerificationError(str(exc)) from exc
    return {"id": entry.id, "key": entry.key, "path": str(path), "files_checked": len(entry.files), "loads": True,
            "weights": weights.report(), "probe": probe}


def loaded(path, model_id: str):
    """The model and its config, with the tokenizer loaded too, as the server would."""
    from mlx_lm import load

    try:
        model, _, config = load(str(path), return_config=True)
    except LOAD_ERRORS as exc:
        raise VerificationError(f"'{model_id}': mlx-lm cannot load it ({exc}); remove it with --remove {model_id} and convert it again") from exc
    return model, config
