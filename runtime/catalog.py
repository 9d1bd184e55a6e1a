"""What a request's `model` may name: a cached id or key, an alias, an entry of the model
configuration files, or a model file/folder under a configured model root."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cache.store import Entry, ModelStore
from errors import ImpetusError, ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """One entry of `config/models/*.json|yaml`."""
    model_id: str
    path: Path
    display_name: str | None = None
    capabilities: tuple = ()
    hints: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRef:
    name: str
    entry: Entry | None = None  # already converted
    source: Path | None = None  # to convert (or find in the cache) first


def read_config_file(path: Path) -> list[ModelConfig]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.warning("ignoring model configuration %s: %s", path, exc)
        return []
    items = raw if isinstance(raw, list) else [raw]
    return [config_entry(item, path.parent) for item in items if isinstance(item, dict) and "model_id" in item and "path" in item]


def config_entry(item: dict, base: Path) -> ModelConfig:
    path = Path(item["path"]).expanduser()
    return ModelConfig(
        model_id=item["model_id"],
        path=path if path.is_absolute() else base / path,
        display_name=item.get("display_name"),
        capabilities=tuple(item.get("capabilities", ())),
        hints=item.get("optimization", item.get("hints", {})) or {},
    )


def under(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


class Catalog:
    def __init__(self, store: ModelStore, aliases: dict[str, str], config_dirs: list[Path], roots: list[Path]):
        self.store = store
        self.aliases = aliases
        self.config_dirs = config_dirs
        self.roots = roots

    def configured(self) -> dict[str, ModelConfig]:
        files = [f for folder in self.config_dirs if folder.is_dir() for f in sorted(folder.iterdir())]
        entries = [e for f in files if f.suffix in (".json", ".yaml", ".yml") for e in read_config_file(f)]
        return {e.model_id: e for e in entries}

    def locate(self, name: str) -> ModelRef:
        wanted = self.aliases.get(name, name)
        if entry := self.store.get(wanted):
            return ModelRef(name, entry=entry)
        if config := self.configured().get(wanted):
            return self._source(name, config.path)
        path = Path(wanted).expanduser()
        if path.is_absolute() and path.exists() and under(path, self.roots):
            return self._source(name, path)
        raise ModelNotFoundError(self._not_found(name, path))

    def _source(self, name: str, path: Path) -> ModelRef:
        from converters.pipeline import already_converted

        try:
            entry = already_converted(path, self.store)
        except ImpetusError:  # not recognisable: converting it will say why, in the request's answer
            entry = None
        return ModelRef(name, entry=entry, source=None if entry else path)

    def _not_found(self, name: str, path: Path) -> str:
        if path.is_absolute() and path.exists():
            roots = ", ".join(map(str, self.roots)) or "none configured"
            return f"The model '{name}' is outside the model roots ({roots}); set IMPETUS_MODEL_ROOTS to allow it."
        known = ", ".join(e.id for e in self.store.entries()) or "none yet"
        return (f"The model '{name}' does not exist. Available models: {known}. "
                "Convert a model first with `python convert.py <file>`, or name a file under a model root.")
