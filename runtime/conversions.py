"""Conversions the server starts for requests: one `convert.py` process per source, shared by every
request that needs it, with its progress passed on (streams turn it into SSE keepalives).

A separate process keeps the server's memory and MLX state out of it, and the cache's file lock
makes a concurrent `convert.py` of the same source from a shell wait for the same result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from cache.store import Entry, ModelStore
from errors import ConversionError

log = logging.getLogger(__name__)

CONVERT = Path(__file__).resolve().parent.parent / "convert.py"
Progress = Callable[[dict], None]


class Conversions:
    def __init__(self, store: ModelStore):
        self.store = store
        self.started = 0  # convert.py processes run (a cache hit costs one too, briefly)
        self.converted = 0  # of which converted something new
        self._running: dict[str, asyncio.Task] = {}
        self._listeners: dict[str, list[Progress]] = {}

    async def ensure(self, source: Path, progress: Progress | None = None) -> Entry:
        """The cached entry for `source`, converting it first if needed (shared with concurrent callers)."""
        key = str(source.resolve())
        if progress:
            self._listeners.setdefault(key, []).append(progress)
        if key not in self._running:
            self._running[key] = asyncio.create_task(self._convert(source, key))
        try:
            return await asyncio.shield(self._running[key])
        finally:
            if progress and progress in self._listeners.get(key, []):
                self._listeners[key].remove(progress)

    async def _convert(self, source: Path, key: str) -> Entry:
        self.started += 1
        try:
            result = await self._run_convert(source, key)
        finally:
            self._running.pop(key, None)
        self.converted += 0 if result["cached"] else 1
        entry = self.store.get(result["key"])
        if entry is None:
            raise ConversionError(f"{source}: converted, but the cache has no entry {result['key']}")
        return entry

    async def _run_convert(self, source: Path, key: str) -> dict:
        env = {**os.environ, "IMPETUS_HOME": str(self.store.home)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(CONVERT), str(source), "--json", "--progress-json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        errors = await self._read_progress(process.stderr, key)
        output = await process.stdout.read()
        if await process.wait() != 0:
            raise ConversionError(errors[-1] if errors else f"{source}: conversion failed")
        return json.loads(output)

    async def _read_progress(self, stream: asyncio.StreamReader, key: str) -> list[str]:
        errors = []
        async for raw in stream:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                self._notify(key, line)
            elif line.startswith("error:"):
                errors.append(line.removeprefix("error:").strip())
        return errors

    def _notify(self, key: str, line: str) -> None:
        try:
            update = json.loads(line)
        except ValueError:
            return
        for listener in self._listeners.get(key, []):
            listener(update)
