"""What the menu says: the status line, the model choices and the Cline settings (no Qt here)."""

from __future__ import annotations

from app.supervisor import Phase, Snapshot

API_KEY = "impetus"
CONVERTING = "converting"
UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(count: int | None) -> str:
    if count is None:
        return "?"
    size = float(count)
    for unit in UNITS[:-1]:
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} {UNITS[-1]}"


def look(snapshot: Snapshot, converting: bool) -> str:
    """The icon's state: a conversion in progress shows over the server's phase."""
    return CONVERTING if converting else snapshot.phase.value


def status_line(snapshot: Snapshot) -> str:
    if snapshot.phase is Phase.RUNNING:
        return running_line(snapshot.status or {}, snapshot.owned)
    if snapshot.phase is Phase.STARTING:
        return "Server starting…"
    if snapshot.phase is Phase.ERROR:
        return "Server error: see the message or the logs"
    return "Server stopped"


def running_line(status: dict, owned: bool) -> str:
    parts = [status.get("model") or "no model", f"{human_bytes(status.get('memory_bytes'))} in use"]
    if (speed := status.get("last_tokens_per_second")) is not None:
        parts.append(f"{speed:.1f} tok/s")
    if status.get("state") not in (None, "idle"):
        parts.append(status["state"])
    if not owned:
        parts.append("attached")
    return " · ".join(parts)


def conversion_line(name: str, done: int | None, total: int | None) -> str:
    if done is None or not total:
        return f"Converting {name}…"
    return f"Converting {name}: {100 * done // total}%"


def model_choices(models: list[dict], snapshot: Snapshot, last_model: str | None) -> list[tuple[str, bool]]:
    """(id, checked) for each cached model, and the resident one even if the cache no longer lists it."""
    active = snapshot.model if snapshot.phase is Phase.RUNNING else last_model
    ids = [model["id"] for model in models]
    if active and active not in ids and snapshot.phase is Phase.RUNNING:
        ids.append(active)
    return [(model_id, model_id == active) for model_id in ids]


def cline_settings(base_url: str, model_id: str) -> str:
    return (
        "API Provider: OpenAI Compatible\n"
        f"Base URL: {base_url}/v1\n"
        f"API Key: {API_KEY}\n"
        f"Model ID: {model_id}\n"
    )
