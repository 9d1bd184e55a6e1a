"""Which models stay in memory: least recently used first out, within a byte budget, with pinning
and Ollama-style idle expiry (`keep_alive`). A model that is generating is never unloaded."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class Resident:
    model: object  # LoadedModel
    bytes: int
    pinned: bool = False
    expires_at: float | None = None  # None: stays until evicted


def expiry(keep_alive: float | None, now: float) -> float | None:
    """keep_alive in seconds: None or negative keeps the model; 0 unloads it once idle."""
    return None if keep_alive is None or keep_alive < 0 else now + keep_alive


class Residency:
    def __init__(self, budget_bytes: int, default_keep_alive: float | None = None):
        self.budget_bytes = budget_bytes
        self.default_keep_alive = default_keep_alive
        self._residents: OrderedDict[str, Resident] = OrderedDict()
        self._sequences: Counter[str] = Counter()  # running sequences per model

    def use(self, key: str) -> None:
        self._sequences[key] += 1

    def done(self, key: str) -> None:
        self._sequences[key] -= 1
        if self._sequences[key] <= 0:
            del self._sequences[key]

    def _removable(self, key: str) -> bool:
        return not self._residents[key].pinned and key not in self._sequences

    def __contains__(self, key: str) -> bool:
        return key in self._residents

    def get(self, key: str):
        resident = self._residents.get(key)
        if resident is None:
            return None
        self._residents.move_to_end(key)
        return resident.model

    def used_bytes(self) -> int:
        return sum(r.bytes for r in self._residents.values())

    def admit(self, key: str, model, size: int, pinned: bool = False) -> None:
        self._residents[key] = Resident(model, size, pinned, expiry(self.default_keep_alive, time.monotonic()))

    def keep(self, key: str, keep_alive: float | None, pinned: bool | None = None) -> None:
        """Restart a model's idle clock after use (keep_alive None: the default)."""
        resident = self._residents.get(key)
        if resident is None:
            return
        chosen = self.default_keep_alive if keep_alive is None else keep_alive
        resident.expires_at = expiry(chosen, time.monotonic())
        if pinned is not None:
            resident.pinned = pinned

    def make_room(self, size: int, keep: str | None = None) -> list[str]:
        """Evict least recently used, unpinned models until `size` more bytes fit; returns evicted keys."""
        evicted = []
        for key in list(self._residents):
            if self.used_bytes() + size <= self.budget_bytes:
                break
            if key != keep and self._removable(key):
                del self._residents[key]
                evicted.append(key)
        return evicted

    def evict_unpinned(self) -> list[str]:
        return self.make_room(1 << 62)

    def evict_others(self, keep: str | None) -> list[str]:
        return self.make_room(1 << 62, keep=keep)

    def drop(self, key: str) -> None:
        self._residents.pop(key, None)

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        gone = [k for k, r in self._residents.items() if self._removable(k) and r.expires_at is not None and r.expires_at <= now]
        for key in gone:
            del self._residents[key]
        return gone

    def next_expiry_in(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        times = [r.expires_at for k, r in self._residents.items() if r.expires_at is not None and self._removable(k)]
        return max(0.0, min(times) - now) if times else None

    def describe(self) -> list[dict]:
        now = time.monotonic()
        return [
            {"key": key, "id": r.model.entry.id, "bytes": r.bytes, "pinned": r.pinned, "layout": r.model.layout,
             "expires_in_seconds": None if r.expires_at is None else round(max(0.0, r.expires_at - now), 1)}
            for key, r in self._residents.items()
        ]
