"""Start the app at login: a LaunchAgent on macOS, an XDG autostart entry on Linux."""

from __future__ import annotations

import os
import plistlib
import sys
from pathlib import Path

from app.server import ROOT

LABEL = "com.impetus.app"
DESKTOP_FILE = "impetus.desktop"
CARRIED_ENV = ("IMPETUS_HOME",)


def app_command() -> list[str]:
    return [sys.executable, "-m", "app"]


def default_directory(platform: str) -> Path:
    if platform == "darwin":
        return Path.home() / "Library" / "LaunchAgents"
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "autostart"


def carried_environment() -> dict[str, str]:
    """What the login-started app needs to find the same cache and settings as this one."""
    return {name: os.environ[name] for name in CARRIED_ENV if name in os.environ}


def launch_agent(command: list[str], workdir: Path, environment: dict[str, str]) -> bytes:
    agent = {"Label": LABEL, "ProgramArguments": command, "WorkingDirectory": str(workdir),
             "RunAtLoad": True, "ProcessType": "Interactive"}
    if environment:
        agent["EnvironmentVariables"] = environment
    return plistlib.dumps(agent)


def desktop_quote(argument: str) -> str:
    """Quote an Exec argument as the Desktop Entry Specification asks."""
    if not any(char in argument for char in ' \t\n"\'\\><~|&;$*?#()`'):
        return argument
    escaped = "".join(f"\\{char}" if char in '"`$\\' else char for char in argument)
    return f'"{escaped}"'


def desktop_entry(command: list[str], workdir: Path, environment: dict[str, str]) -> bytes:
    prefix = ["env", *(f"{name}={value}" for name, value in environment.items())] if environment else []
    lines = [
        "[Desktop Entry]",
        "Type=Application",
        "Name=Impetus",
        "Comment=Local LLM server in the tray",
        "Exec=" + " ".join(desktop_quote(arg) for arg in [*prefix, *command]),
        f"Path={workdir}",
        "Terminal=false",
        "X-GNOME-Autostart-enabled=true",
    ]
    return ("\n".join(lines) + "\n").encode()


class LoginItem:
    def __init__(self, platform: str = sys.platform, directory: Path | None = None):
        self.platform = platform
        self.directory = directory or default_directory(platform)

    @property
    def supported(self) -> bool:
        return self.platform == "darwin" or self.platform.startswith("linux")

    @property
    def path(self) -> Path:
        return self.directory / (f"{LABEL}.plist" if self.platform == "darwin" else DESKTOP_FILE)

    def enabled(self) -> bool:
        return self.path.is_file()

    def enable(self) -> Path:
        render = launch_agent if self.platform == "darwin" else desktop_entry
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(render(app_command(), ROOT, carried_environment()))
        return self.path

    def disable(self) -> None:
        self.path.unlink(missing_ok=True)
