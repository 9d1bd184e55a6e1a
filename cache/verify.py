"""`convert.py --verify`: a cached checkpoint is what was committed (sha256 of every file) and mlx-lm
still loads it and computes finite logits with it."""

from __future__ import annotations

from cache.fingerprint import changed_files
from cache.store import ModelStore
from errors import ImpetusError

# What mlx-lm and safetensors raise on damaged or inconsistent checkpoint files.
LOAD_ERRORS = (ValueError, RuntimeError, OSError, KeyError)


class VerificationError(ImpetusError):
    """A cached checkpoint no longer matches what was committed, or does not load."""


def verify_entry(store: ModelStore, name: str) -> dict:
    entry = store.require(name)
    path = store.checkpoint_path(entry)
    problems = changed_files(path, entry.files)
    if problems:
        raise VerificationError(f"'{entry.id}': {'; '.join(problems)}; remove it with --remove {entry.id} and convert it again")
    check_loads(path, entry.id)
    return {"id": entry.id, "key": entry.key, "path": str(path), "files_checked": len(entry.files), "loads": True}


def check_loads(path, model_id: str) -> None:
    import mlx.core as mx
    from mlx_lm import load

    try:
        model, tokenizer = load(str(path))
        logits = model(mx.array([[tokenizer.bos_token_id or 0]]))
        finite = mx.all(mx.isfinite(logits)).item()
    except LOAD_ERRORS as exc:
        raise VerificationError(f"'{model_id}': mlx-lm cannot load it ({exc}); remove it with --remove {model_id} and convert it again") from exc
    if not finite:
        raise VerificationError(f"'{model_id}': mlx-lm loads it but its logits are not finite; remove it and convert it again")
