"""What the app remembers between runs, as JSON under IMPETUS_HOME."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "app.json"
MAX_ROOTS = 5


@dataclass
class Preferences:
    host: str = "127.0.0.1"
    port: int = 8080
    last_model: str | None = None
    # Folders models were picked from, most recent first: the file dialog opens in the first.
    model_roots: list[str] = field(default_factory=list)
    start_server_on_launch: bool = True

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def remember_root(self, folder: Path) -> None:
        folder_name = str(folder)
        self.model_roots = [folder_name, *(r for r in self.model_roots if r != folder_name)][:MAX_ROOTS]

    @classmethod
    def load(cls, path: Path) -> Preferences:
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable preferences %s (%s); using defaults", path, exc)
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)
