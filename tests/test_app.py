"""The Impetus tray app, offscreen, driving real `python -m api` and `convert.py` processes.

Every menu action is triggered as a user would (QAction.trigger); only the file chooser, the message
display and the URL opener are injected, so no modal dialog or browser blocks the tests.
"""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app import display
from app.autostart import LoginItem
from app.conversion import Progress
from app.preferences import FILE_NAME, Preferences
from app.supervisor import Phase, Snapshot, Supervisor
from cache.store import ModelStore
from converters.pipeline import ensure_converted
from tests.conftest import ROOT, free_port, wait_healthy
from tests.tiny_models import ARCHS, Q, build_model, write_gguf

DOCS = ROOT / "docs"
WAIT_MS = 180_000  # server starts import MLX and torch: slow on a busy two-core machine
MODEL_A, MODEL_B, MODEL_C = "tiny-a-q4_0", "tiny-b-q4_0", "tiny-c-q4_0"


@pytest.fixture(scope="session")
def qapp_args():
    # Set before pytest-qt creates the one QApplication: no display is needed, and screenshots look the same everywhere.
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    return ["impetus-tests"]


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    arch = ARCHS["llama"]
    return {name: write_gguf(build_model(arch, seed=seed), arch, folder / f"Tiny-{name}.Q4_0.gguf", Q.Q4_0)
            for seed, name in enumerate("ABC")}


@pytest.fixture(scope="session")
def converted_home(tmp_path_factory, tiny_sources) -> Path:
    """A cache holding tiny models A and B (C is left for the app to convert)."""
    home = tmp_path_factory.mktemp("converted") / "home"
    for name in "AB":
        ensure_converted(tiny_sources[name], ModelStore(home))
    return home


@pytest.fixture
def home(converted_home, tmp_path) -> Path:
    return Path(shutil.copytree(converted_home, tmp_path / "home"))


def corrupt_copy(source: Path, folder: Path) -> Path:
    cut = folder / "Broken.Q4_0.gguf"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return cut


@dataclass
class Harness:
    tray: object
    home: Path
    port: int
    chosen: list[Path] = field(default_factory=list)
    messages: list[tuple[str, str, bool]] = field(default_factory=list)
    opened: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trigger(self, name: str) -> None:
        action = self.tray.actions[name]
        assert action.isEnabled(), f"'{action.text()}' is disabled"
        action.trigger()

    def model_actions(self) -> dict[str, bool]:
        return {a.text(): a.isChecked() for a in self.tray.models_menu.actions() if a.isCheckable()}

    def errors(self) -> list[str]:
        return [text for _, text, is_error in self.messages if is_error]


@pytest.fixture
def make_app(qtbot, tmp_path):
    from app.tray import TrayApp

    made = []

    def make(home: Path, port: int | None = None, last_model: str = MODEL_A) -> Harness:
        port = port or free_port()
        prefs = Preferences(port=port, last_model=last_model)
        supervisor = Supervisor(home, "127.0.0.1", port, home / "logs" / "server.log")
        harness = Harness(None, home, port)
        harness.tray = TrayApp(supervisor, prefs, home / FILE_NAME, LoginItem("linux", tmp_path / "autostart"),
                               choose_source=lambda kind, start: harness.chosen.pop(0),
                               notify=lambda *message: harness.messages.append(message),
                               open_url=harness.opened.append)
        harness.tray.show()
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.tray.shutdown()  # stops a server a failed test left running


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fetch(url: str, body: dict | None = None) -> bytes:
    """GET (or POST `body`) with the server's own error message in the failure, if it answers with one."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url} answered {exc.code}: {exc.read()[:500]!r}") from exc


def get_json(url: str) -> dict:
    return json.loads(fetch(url))


def chat(url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "the"}], "max_tokens": 8}
    assert json.loads(fetch(f"{url}/v1/chat/completions", body))["model"] == model


def wait_running(qtbot, app: Harness, model: str) -> None:
    def serving() -> bool:
        return app.tray.snapshot.phase is Phase.RUNNING and app.tray.snapshot.model == model

    qtbot.waitUntil(serving, timeout=WAIT_MS)


def save_menu_screenshot(qtbot, tray, path: Path) -> None:
    """The menu with its Model submenu open beside it, as one PNG."""
    from PySide6.QtCore import QPoint
    from PySide6.QtGui import QColor, QPainter, QPixmap

    menu, submenu = tray.menu, tray.models_menu
    menu.popup(QPoint(0, 0))
    qtbot.waitExposed(menu)
    top = menu.actionGeometry(submenu.menuAction()).top()
    submenu.popup(QPoint(menu.width(), top))
    qtbot.waitExposed(submenu)
    shot = QPixmap(menu.width() + submenu.width(), max(menu.height(), top + submenu.height()))
    shot.fill(QColor("#dfe3e8"))
    painter = QPainter(shot)
    painter.drawPixmap(0, 0, menu.grab())
    painter.drawPixmap(menu.width(), top, submenu.grab())
    painter.end()
    submenu.hide()
    menu.hide()
    assert shot.save(str(path))


def save_icon_strip(path: Path) -> None:
    from PySide6.QtCore import QRect, Qt
    from PySide6.QtGui import QColor, QPainter, QPixmap

    from app.icons import COLORS, SIZE, state_pixmap

    cell = SIZE + 40
    strip = QPixmap(cell * len(COLORS), SIZE + 36)
    strip.fill(QColor("white"))
    painter = QPainter(strip)
    for column, state in enumerate(COLORS):
        painter.drawPixmap(column * cell + 20, 6, state_pixmap(state))
        painter.drawText(QRect(column * cell, SIZE + 8, cell, 24), Qt.AlignmentFlag.AlignCenter, state)
    painter.end()
    path.parent.mkdir(exist_ok=True)
    assert strip.save(str(path))


def test_menu_drives_a_real_server(qtbot, make_app, home, tiny_sources, tmp_path):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    from app.tray import POLL_RUNNING_MS

    app = make_app(home)
    qtbot.wait(200)
    assert app.tray.state == "stopped" and app.tray.status_action.text() == "Server stopped"
    assert not app.tray.actions["stop"].isEnabled()
    assert not app.tray.poll_timer.isActive()  # nothing polls while stopped

    # Start: a child process tracked by PID, its output drained into the log file.
    app.trigger("start")
    qtbot.waitUntil(lambda: app.tray.state == "starting", timeout=WAIT_MS)
    wait_running(qtbot, app, MODEL_A)
    assert app.tray.poll_timer.isActive() and app.tray.poll_timer.interval() == POLL_RUNNING_MS
    pid = app.tray.snapshot.pid
    assert alive(pid) and (home / "server.pid").read_text() == str(pid)
    assert app.tray.state == "running" and get_json(f"{app.url}/health")["model"] == MODEL_A
    assert MODEL_A in app.tray.status_action.text() and "in use" in app.tray.status_action.text()

    # Switch model through the Model submenu; the check moves and the choice is remembered.
    qtbot.waitUntil(lambda: app.model_actions() == {MODEL_A: True, MODEL_B: False}, timeout=WAIT_MS)
    next(a for a in app.tray.models_menu.actions() if a.text() == MODEL_B).trigger()
    wait_running(qtbot, app, MODEL_B)
    assert get_json(f"{app.url}/health")["model"] == MODEL_B
    qtbot.waitUntil(lambda: app.model_actions() == {MODEL_A: False, MODEL_B: True})
    assert json.loads((home / FILE_NAME).read_text())["last_model"] == MODEL_B

    # Convert a model file: progress window fed by convert.py's progress lines, then the model is listed.
    app.chosen.append(tiny_sources["C"])
    app.trigger("convert")
    assert app.tray.state == "converting" and app.tray.progress_window.isVisible()
    qtbot.waitUntil(lambda: app.tray.conversion is None, timeout=WAIT_MS)
    window = app.tray.progress_window
    assert window.last_progress == Progress("tensors", 21, 21)  # convert.py's progress lines reached the window
    assert window.bar.maximum() == 100 and window.bar.value() == 100
    assert f"Ready as '{MODEL_C}'" in window.stage.text() and window.button.text() == "Close"
    assert app.tray.state == "running" and app.errors() == []
    assert json.loads((home / FILE_NAME).read_text())["model_roots"] == [str(tiny_sources["C"].parent)]
    DOCS.mkdir(exist_ok=True)
    assert window.grab().save(str(DOCS / "app-progress.png"))
    qtbot.waitUntil(lambda: MODEL_C in app.model_actions(), timeout=WAIT_MS)

    # A corrupt file: the error is shown in words, and the app goes on working.
    app.chosen.append(corrupt_copy(tiny_sources["A"], tmp_path))
    app.trigger("convert")
    qtbot.waitUntil(lambda: app.tray.conversion is None, timeout=WAIT_MS)
    assert len(app.errors()) == 1 and "Broken.Q4_0.gguf" in app.errors()[0] and "truncated" in app.errors()[0]
    assert app.tray.progress_window.stage.text().startswith("Failed:")
    assert app.tray.state == "running"

    # Cancel: the conversion process is stopped, nothing is added, and it is not reported as an error.
    cached = sorted(e.id for e in ModelStore(home).entries())
    app.chosen.append(Path(shutil.copy(tiny_sources["A"], tmp_path / "Tiny-D.Q4_0.gguf")))
    app.trigger("convert")
    app.tray.progress_window.button.click()
    qtbot.waitUntil(lambda: app.tray.conversion is None, timeout=WAIT_MS)
    assert app.tray.progress_window.stage.text().startswith("Cancelled") and len(app.errors()) == 1
    assert sorted(e.id for e in ModelStore(home).entries()) == cached == [MODEL_A, MODEL_B, MODEL_C]
    next(a for a in app.tray.models_menu.actions() if a.text() == MODEL_C).trigger()
    wait_running(qtbot, app, MODEL_C)

    # Status line: memory and the last generation's speed, picked up by the next poll.
    chat(app.url, MODEL_C)
    app.tray.refresh()
    qtbot.waitUntil(lambda: "tok/s" in app.tray.status_action.text(), timeout=WAIT_MS)
    save_menu_screenshot(qtbot, app.tray, DOCS / "app-menu.png")

    app.trigger("copy_cline")
    copied = QGuiApplication.clipboard().text()
    assert f"Base URL: {app.url}/v1" in copied and f"Model ID: {MODEL_C}" in copied and "API Key: impetus" in copied

    app.trigger("open_web")
    assert app.opened[-1] == QUrl(f"{app.url}/docs")
    assert b"swagger" in fetch(app.opened[-1].toString()).lower()

    app.trigger("show_logs")
    log_file = Path(app.opened[-1].toLocalFile())
    assert log_file == home / "logs" / "server.log"
    logged = log_file.read_text()
    assert "Uvicorn running" in logged and "POST /api/models/switch" in logged

    app.trigger("start_at_login")
    entry = app.tray.login_item.path
    assert entry.is_file() and "-m app" in entry.read_text() and app.tray.actions["start_at_login"].isChecked()
    app.trigger("start_at_login")
    assert not entry.exists() and not app.tray.actions["start_at_login"].isChecked()

    # Stop: SIGTERM to our PID; the process is gone, and so are the PID file and the polling.
    app.trigger("stop")
    qtbot.waitUntil(lambda: app.tray.state == "stopped", timeout=WAIT_MS)
    assert not alive(pid) and not (home / "server.pid").exists()
    assert not app.tray.poll_timer.isActive() and app.tray.actions["start"].isEnabled()
    assert len(app.errors()) == 1  # only the corrupt file's


def test_crash_is_noticed_and_quit_leaves_no_server(qtbot, make_app, home):
    app = make_app(home)
    app.trigger("start")
    wait_running(qtbot, app, MODEL_A)
    crashed = app.tray.snapshot.pid
    os.kill(crashed, signal.SIGKILL)

    # Noticed when the server's output pipe closes, not by a fast poll.
    qtbot.waitUntil(lambda: app.tray.state == "error", timeout=30_000)
    assert app.errors() == ["The server stopped unexpectedly (signal SIGKILL)."]
    assert app.tray.status_action.text().startswith("Server error")
    assert not alive(crashed) and not (home / "server.pid").exists()

    # The app keeps working: start again, then quit, which stops the server it started.
    app.trigger("start")
    wait_running(qtbot, app, MODEL_A)
    restarted = app.tray.snapshot.pid
    assert restarted != crashed and alive(restarted)
    app.trigger("restart")
    qtbot.waitUntil(lambda: app.tray.snapshot.pid not in (None, restarted), timeout=WAIT_MS)
    wait_running(qtbot, app, MODEL_A)
    last = app.tray.snapshot.pid
    assert not alive(restarted)
    app.trigger("quit")
    assert not alive(last) and not (home / "server.pid").exists()


def test_a_server_that_cannot_start_is_an_error_in_words(qtbot, make_app, home):
    app = make_app(home, last_model="no-such-model")
    app.trigger("start")
    qtbot.waitUntil(lambda: app.tray.state == "error", timeout=WAIT_MS)
    [error] = app.errors()
    assert error.startswith("The server could not start (exit code 1).")
    assert "'no-such-model' is neither a cached model id nor a model file or folder" in error


def test_attaches_to_a_server_started_elsewhere_and_leaves_it_running(qtbot, make_app, home):
    port = free_port()
    command = [sys.executable, "-m", "api", "--port", str(port), "--model", MODEL_B]
    log = (home / "elsewhere.log").open("w")
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "IMPETUS_HOME": str(home)},
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}")
        app = make_app(home, port=port)
        app.trigger("start")
        wait_running(qtbot, app, MODEL_B)
        assert not app.tray.snapshot.owned and app.tray.snapshot.pid is None
        assert "attached" in app.tray.status_action.text()
        assert any("already running" in text for _, text, _ in app.messages)
        assert not app.tray.actions["stop"].isEnabled() and not app.tray.actions["restart"].isEnabled()
        app.trigger("quit")
        assert server.poll() is None and get_json(f"{app.url}/health")["model"] == MODEL_B
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_python_m_app_is_single_instance_and_stops_its_server_on_sigterm(home):
    port = free_port()
    Preferences(port=port, last_model=MODEL_A).save(home / FILE_NAME)
    env = {**os.environ, "IMPETUS_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"}
    first = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(first, f"http://127.0.0.1:{port}")
        server_pid = int((home / "server.pid").read_text())
        second = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 0 and "already running" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
    assert not alive(server_pid)
    assert "server stopped" in (home / "logs" / "app.log").read_text()


def test_icons_differ_by_state_and_status_lines_read_well(qapp):
    from app.icons import COLORS, state_pixmap

    images = {state: state_pixmap(state).toImage() for state in COLORS}
    assert len({image.bits().tobytes() for image in images.values()}) == len(COLORS)
    save_icon_strip(DOCS / "app-icons.png")

    status = {"model": MODEL_A, "memory_bytes": 3 * 1024**2, "last_tokens_per_second": 41.25, "state": "idle"}
    running = Snapshot(Phase.RUNNING, owned=True, status=status)
    assert display.status_line(running) == f"{MODEL_A} · 3.0 MB in use · 41.2 tok/s"
    assert display.look(running, converting=True) == "converting"
    stopped = Snapshot(Phase.STOPPED)
    choices = display.model_choices([{"id": MODEL_A}, {"id": MODEL_B}], stopped, last_model=MODEL_B)
    assert choices == [(MODEL_A, False), (MODEL_B, True)]


def test_preferences_are_remembered(tmp_path):
    path = tmp_path / FILE_NAME
    prefs = Preferences.load(path)
    prefs.port, prefs.last_model = 9123, MODEL_B
    for folder in ["/m/one", "/m/two", "/m/one"]:
        prefs.remember_root(Path(folder))
    prefs.save(path)
    again = Preferences.load(path)
    assert (again.port, again.last_model, again.model_roots) == (9123, MODEL_B, ["/m/one", "/m/two"])
    path.write_text("{not json")
    assert Preferences.load(path) == Preferences()


def test_login_items_for_macos_and_linux(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPETUS_HOME", str(tmp_path / "my home"))
    mac = LoginItem("darwin", tmp_path / "LaunchAgents")
    mac.enable()
    agent = plistlib.loads(mac.path.read_bytes())
    assert mac.path.name == "com.impetus.app.plist" and agent["RunAtLoad"] is True
    assert agent["ProgramArguments"] == [sys.executable, "-m", "app"]
    assert agent["EnvironmentVariables"] == {"IMPETUS_HOME": str(tmp_path / "my home")}

    linux = LoginItem("linux", tmp_path / "autostart")
    assert not linux.enabled()
    linux.enable()
    entry = configparser.ConfigParser(interpolation=None)
    entry.read(linux.path)
    assert entry["Desktop Entry"]["Exec"] == f'env "IMPETUS_HOME={tmp_path / "my home"}" {sys.executable} -m app'
    linux.disable()
    assert not linux.enabled() and not LoginItem("win32", tmp_path).supported


def test_convert_progress_json_lines_keep_the_json_contract(tiny_sources, tmp_path):
    command = [sys.executable, "convert.py", str(tiny_sources["A"]), "--json", "--progress-json"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "IMPETUS_HOME": str(tmp_path / "home")},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == MODEL_A
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events[0] == {"stage": "tensors", "done": 0, "total": 21}
    assert events[-1] == {"stage": "tensors", "done": 21, "total": 21}
    assert "\r" not in result.stderr
