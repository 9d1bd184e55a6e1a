"""Prefix KV cache across requests: reuse the longest cached token prefix (system prompt, tools,
history), within a byte budget, and keep the newest entries on disk so a restarted server has them.
Entries reach the disk when the runtime has been idle a moment (`flush`), not while requests are answered.

Built on mlx-lm's LRUPromptCache (a token trie with LRU eviction) and its cache save/load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

log = logging.getLogger(__name__)


class PromptCache:
    def __init__(self, directory: Path | None, max_bytes: int, max_entries: int = 8, persisted: int = 4):
        self.directory = directory
        self.max_bytes = max_bytes
        self.persisted = persisted
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self._unsaved: dict[str, list[tuple[list[int], list]]] = {}  # model key -> (tokens, cache), oldest first

    def fetch(self, model_key: str, model, prompt: list[int]) -> tuple[list, int]:
        """(a KV cache to continue from, how many prompt tokens it already holds)."""
        cache, rest = self._lru.fetch_nearest_cache(model_key, prompt)
        if cache is None:
            return make_prompt_cache(model), 0
        cached = len(prompt) - len(rest)
        if cached == len(prompt):  # the model must still see at least one token
            if not can_trim_prompt_cache(cache):
                return make_prompt_cache(model), 0
            trim_prompt_cache(cache, 1)
            cached -= 1
        return cache, cached

    def store(self, model_key: str, tokens: list[int], cache: list) -> None:
        """Keep a cache under exactly the tokens it holds (prompt + sampled, cut or trimmed to match)."""
        held = aligned_tokens(tokens, cache)
        if not held:
            return
        self._lru.insert_cache(model_key, held, cache)
        if self.directory is not None:  # only the newest `persisted` stay on disk: no use writing older ones
            self._unsaved[model_key] = [*self._unsaved.get(model_key, []), (held, cache)][-self.persisted :]

    def unsaved(self) -> bool:
        return bool(self._unsaved)

    def flush(self) -> None:
        """Write the entries stored since the last flush to disk."""
        unsaved, self._unsaved = self._unsaved, {}
        for model_key, entries in unsaved.items():
            for tokens, cache in entries:
                self._persist(model_key, tokens, cache)

    def restore(self, model_key: str) -> int:
        """Load the entries persisted for a model; returns how many."""
        if self.directory is None:
            return 0
        files = self._files(model_key)[: self.persisted]
        for path in reversed(files):  # oldest first, so the newest ends most recently used
            self._restore_one(model_key, path)
        return len(files)

    def _restore_one(self, model_key: str, path: Path) -> None:
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
        except Exception as exc:  # a damaged file only costs its entry
            log.warning("dropping unreadable prompt cache %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return
        self._lru.insert_cache(model_key, json.loads(metadata["tokens"]), cache)

    def _folder(self, model_key: str) -> Path:
        return self.directory / model_key

    def _files(self, model_key: str) -> list[Path]:
        folder = self._folder(model_key)
        files = folder.glob("*.safetensors") if folder.is_dir() else []
        return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def _persist(self, model_key: str, tokens: list[int], cache: list) -> None:
        folder = self._folder(model_key)
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:20]
        partial = folder / f"{name}.partial.safetensors"
        save_prompt_cache(str(partial), cache, metadata={"tokens": json.dumps(tokens)})
        partial.replace(folder / f"{name}.safetensors")
        for stale in self._files(model_key)[self.persisted :]:
            stale.unlink(missing_ok=True)


def aligned_tokens(tokens: list[int], cache: list) -> list[int] | None:
    """The tokens whose keys and values `cache` holds; None if that cannot be made exact."""
    offset = getattr(cache[0], "offset", None) if cache else None
    if offset is None:
        return None
    if offset > len(tokens):  # it saw a token we did not record: drop it, or do not keep the cache
        if not can_trim_prompt_cache(cache):
            return None
        trim_prompt_cache(cache, offset - len(tokens))
        return tokens
    return tokens[:offset]
