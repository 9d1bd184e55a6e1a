"""The tray / menu-bar icon and its menu: a thin Qt layer over the supervisor, conversions and login item.

Blocking work (HTTP calls, process starts and stops) runs on one worker thread, in order; results
come back to the Qt thread through a queued signal. Status is polled only while a server runs.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from collections.abc import Callable

from PySide6.QtCore import QCoreApplication, QObject, Qt, QTimer, QUrl, Signal, Slot
from PySide6.QtGui import QAction, QCursor, QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QFileDialog, QMenu, QMessageBox, QSystemTrayIcon

from app import display, icons
from app.autostart import LoginItem
from app.conversion import ConversionRun, Outcome, Progress
from app.preferences import Preferences
from app.progress import ProgressWindow
from app.supervisor import Phase, Snapshot, Supervisor
from settings import DEFAULT_MODEL_ALIAS

log = logging.getLogger(__name__)

POLL_STARTING_MS = 500
POLL_RUNNING_MS = 5000
MODEL_FILTER = "Model files (*.gguf *.safetensors *.bin *.pt *.pth *.onnx *.mlmodel);;All files (*)"

Chooser = Callable[[str, Path | None], Path | None]  # (kind: "file" | "folder", start folder) -> path
Notifier = Callable[[str, str, bool], None]  # (title, text, is_error)


def ask_for_source(kind: str, start: Path | None) -> Path | None:
    folder = str(start or Path.home())
    if kind == "folder":
        chosen = QFileDialog.getExistingDirectory(None, "Convert a model folder", folder)
    else:
        chosen, _ = QFileDialog.getOpenFileName(None, "Convert a model file", folder, MODEL_FILTER)
    return Path(chosen) if chosen else None


class MessageBoxes:
    """Non-modal message boxes: a message never blocks the menu or the polling."""

    def __init__(self):
        self.shown: list[QMessageBox] = []

    def __call__(self, title: str, text: str, is_error: bool) -> None:
        icon = QMessageBox.Icon.Critical if is_error else QMessageBox.Icon.Information
        box = QMessageBox(icon, title, text)
        box.finished.connect(lambda _: self.shown.remove(box))
        self.shown.append(box)
        box.show()
        box.raise_()  # a tray app has no window of its own to bring it forward
        box.activateWindow()


class MainThread(QObject):
    """Runs callables handed over from other threads on the Qt thread."""

    call = Signal(object)

    def __init__(self):
        super().__init__()
        self.call.connect(self._run, Qt.ConnectionType.QueuedConnection)

    @Slot(object)
    def _run(self, function: Callable[[], None]) -> None:
        function()


class TrayApp(QObject):
    def __init__(self, supervisor: Supervisor, prefs: Preferences, prefs_path: Path, login_item: LoginItem,
                 choose_source: Chooser = ask_for_source, notify: Notifier | None = None,
                 open_url: Callable[[QUrl], bool] = QDesktopServices.openUrl):
        super().__init__()
        self.supervisor = supervisor
        self.prefs = prefs
        self.prefs_path = prefs_path
        self.login_item = login_item
        self.choose_source = choose_source
        self.notify = notify or MessageBoxes()
        self.open_url = open_url
        self.snapshot = supervisor.snapshot
        self.models: list[dict] = []
        self.conversion: ConversionRun | None = None
        self.progress_window: ProgressWindow | None = None
        self.closed = False
        self.main_thread = MainThread()
        self.jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="impetus-server")
        supervisor.on_exit = lambda code: self.main_thread.call.emit(self.refresh)
        self.poll_timer = self._make_poll_timer()
        self.menu = QMenu()
        self.actions: dict[str, QAction] = {}
        self._build_menu()
        self.tray = QSystemTrayIcon()
        self.tray.setContextMenu(self.menu)
        self.tray.activated.connect(self._icon_clicked)
        self._show_state()

    @property
    def state(self) -> str:
        return display.look(self.snapshot, self.conversion is not None)

    def show(self) -> None:
        if not QSystemTrayIcon.isSystemTrayAvailable():
            log.warning("no system tray on this desktop: the Impetus icon cannot be shown")
        self.tray.show()
        self._load_models()

    # Server actions

    def start_server(self) -> None:
        self._server_job(lambda: self.supervisor.start(self._model_to_start()))

    def stop_server(self) -> None:
        self._server_job(self.supervisor.stop)

    def restart_server(self) -> None:
        self._server_job(lambda: self.supervisor.restart(self._model_to_start()))

    def refresh(self) -> None:
        self._server_job(self.supervisor.poll)

    def switch_model(self, model_id: str) -> None:
        if self.snapshot.phase is not Phase.RUNNING:
            self.prefs.last_model = model_id  # the model the next start serves
            self._save_prefs()
            self._fill_models_menu()
            return
        self.status_action.setText(f"Switching to {model_id}…")
        self._server_job(lambda: self.supervisor.switch(model_id))

    # Conversion

    def convert_model(self, kind: str = "file") -> None:
        if self.conversion is not None:
            self.progress_window.raise_()
            return
        source = self.choose_source(kind, self._start_folder())
        if source is None:
            return
        self.prefs.remember_root(source.parent)
        self._save_prefs()
        self.progress_window = ProgressWindow(source.name, self.cancel_conversion)
        self.progress_window.show()
        self.conversion = ConversionRun(source, self.supervisor.home, self._handed_over(self._conversion_progress),
                                        self._handed_over(self._conversion_done))
        self.conversion.start()
        self._show_state()

    def cancel_conversion(self) -> None:
        if self.conversion is not None:
            self.conversion.cancel()

    # Everything else in the menu

    def copy_cline_settings(self) -> None:
        model_id = self.snapshot.model or self.prefs.last_model or DEFAULT_MODEL_ALIAS
        QGuiApplication.clipboard().setText(display.cline_settings(self.supervisor.base_url, model_id))

    def open_web_page(self) -> None:
        self.open_url(QUrl(f"{self.supervisor.base_url}/docs"))

    def show_logs(self) -> None:
        path = self.supervisor.log_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        self.open_url(QUrl.fromLocalFile(str(path)))

    def set_start_at_login(self, enabled: bool) -> None:
        try:
            self.login_item.enable() if enabled else self.login_item.disable()
        except OSError as exc:
            self.notify("Start at login", f"Could not change {self.login_item.path}: {exc}", True)
        self.actions["start_at_login"].setChecked(self.login_item.enabled())

    def quit(self) -> None:
        self.shutdown()
        QCoreApplication.quit()

    def shutdown(self) -> None:
        """Stop what this app started: the conversion, the polling and the server (not one it attached to)."""
        if self.closed:
            return
        self.closed = True
        self.poll_timer.stop()
        self.cancel_conversion()
        self.jobs.shutdown(wait=False, cancel_futures=True)
        self.supervisor.shutdown()
        self.tray.hide()

    # Menu

    def _build_menu(self) -> None:
        self.status_action = self._add_info("Server stopped")
        self.conversion_action = self._add_info("")
        self.menu.addSeparator()
        self._add("start", "Start server", self.start_server)
        self._add("stop", "Stop server", self.stop_server)
        self._add("restart", "Restart server", self.restart_server)
        self.models_menu = self.menu.addMenu("Model")
        self.models_menu.aboutToShow.connect(self._load_models)
        self._add("convert", "Convert a model…", lambda: self.convert_model("file"))
        self._add("convert_folder", "Convert a model folder…", lambda: self.convert_model("folder"))
        self.menu.addSeparator()
        self._add("copy_cline", "Copy Cline settings", self.copy_cline_settings)
        self._add("open_web", "Open web page", self.open_web_page)
        self._add("show_logs", "Show logs", self.show_logs)
        self.menu.addSeparator()
        self._add_login_toggle()
        self.menu.addSeparator()
        self._add("quit", "Quit Impetus", self.quit)
        self.menu.aboutToShow.connect(self._menu_opened)

    def _add(self, name: str, text: str, slot: Callable[[], None]) -> QAction:
        action = self.menu.addAction(text)
        action.triggered.connect(lambda _checked=False: slot())
        self.actions[name] = action
        return action

    def _add_info(self, text: str) -> QAction:
        action = self.menu.addAction(text)
        action.setEnabled(False)
        return action

    def _add_login_toggle(self) -> None:
        action = self.menu.addAction("Start at login")
        action.setCheckable(True)
        action.setChecked(self.login_item.enabled())
        action.setEnabled(self.login_item.supported)
        action.toggled.connect(self.set_start_at_login)
        self.actions["start_at_login"] = action

    def _icon_clicked(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        # macOS opens the menu on any click by itself; Linux trays show it only on a right click.
        if reason is QSystemTrayIcon.ActivationReason.Trigger and sys.platform != "darwin":
            self.menu.popup(QCursor.pos())

    def _menu_opened(self) -> None:
        # Opening the menu is the moment to notice a server started elsewhere: no polling while stopped.
        if self.snapshot.phase in (Phase.STOPPED, Phase.RUNNING):
            self.refresh()

    def _fill_models_menu(self) -> None:
        self.models_menu.clear()
        choices = display.model_choices(self.models, self.snapshot, self.prefs.last_model)
        if not choices:
            self.models_menu.addAction("No models yet: convert one").setEnabled(False)
        for model_id, checked in choices:
            action = self.models_menu.addAction(model_id)
            action.setCheckable(True)
            action.setChecked(checked)
            action.triggered.connect(lambda _checked=False, chosen=model_id: self.switch_model(chosen))

    # State

    def _show_state(self) -> None:
        self.tray.setIcon(icons.state_icon(self.state))
        line = display.status_line(self.snapshot)
        self.status_action.setText(line)
        self.tray.setToolTip(f"Impetus: {line}")
        self.conversion_action.setVisible(self.conversion is not None)
        self._enable_actions()

    def _enable_actions(self) -> None:
        phase, owned = self.snapshot.phase, self.snapshot.owned
        self.actions["start"].setEnabled(phase in (Phase.STOPPED, Phase.ERROR))
        self.actions["stop"].setEnabled(owned and phase in (Phase.STARTING, Phase.RUNNING))
        self.actions["restart"].setEnabled(owned and phase is Phase.RUNNING)
        self.actions["open_web"].setEnabled(phase is Phase.RUNNING)
        self.models_menu.setEnabled(phase is not Phase.STARTING)

    def _apply(self, snapshot: Snapshot) -> None:
        previous, self.snapshot = self.snapshot, snapshot
        if snapshot.message and snapshot.message != previous.message:
            self.notify("Impetus", snapshot.message, snapshot.phase is Phase.ERROR)
        if snapshot.model and snapshot.model != self.prefs.last_model:
            self.prefs.last_model = snapshot.model
            self._save_prefs()
        if (snapshot.phase, snapshot.model) != (previous.phase, previous.model):
            self._load_models()
        self._show_state()
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        delays = {Phase.STARTING: POLL_STARTING_MS, Phase.RUNNING: POLL_RUNNING_MS}
        if (delay := delays.get(self.snapshot.phase)) is None:
            self.poll_timer.stop()
        else:
            self.poll_timer.start(delay)

    def _make_poll_timer(self) -> QTimer:
        timer = QTimer(self)
        timer.setSingleShot(True)  # the next poll is scheduled when this one's answer arrives
        timer.timeout.connect(self.refresh)
        return timer

    # Conversion callbacks (on the Qt thread)

    def _conversion_progress(self, progress: Progress) -> None:
        if self.closed:
            return
        self.progress_window.show_progress(progress)
        line = display.conversion_line(self.conversion.source.name, progress.done, progress.total)
        self.conversion_action.setText(line)

    def _conversion_done(self, outcome: Outcome) -> None:
        if self.closed:
            return
        name = self.conversion.source.name
        self.conversion = None
        self.progress_window.finish(outcome)
        if outcome.error and not outcome.cancelled:
            self.notify("Conversion failed", f"{name}: {outcome.error}", True)
        self._load_models()
        self._show_state()

    # Plumbing

    def _server_job(self, work: Callable[[], Snapshot]) -> None:
        self._in_background(work, self._apply)

    def _load_models(self) -> None:
        self._in_background(self.supervisor.models, self._models_loaded)

    def _models_loaded(self, models: list[dict]) -> None:
        self.models = models
        self._fill_models_menu()

    def _in_background(self, work: Callable[[], object], then: Callable[[object], None]) -> None:
        if self.closed:
            return
        future = self.jobs.submit(work)
        future.add_done_callback(lambda done: self.main_thread.call.emit(partial(self._deliver, done, then)))

    def _deliver(self, future: Future, then: Callable[[object], None]) -> None:
        if self.closed or future.cancelled():
            return
        if (error := future.exception()) is not None:
            log.error("server request failed: %s", error)
            self.notify("Impetus", str(error), True)
            self._show_state()
            self._schedule_poll()
            return
        then(future.result())

    def _handed_over(self, function: Callable[[object], None]) -> Callable[[object], None]:
        return lambda value: self.main_thread.call.emit(partial(function, value))

    def _model_to_start(self) -> str:
        return self.prefs.last_model or DEFAULT_MODEL_ALIAS

    def _start_folder(self) -> Path | None:
        return Path(self.prefs.model_roots[0]) if self.prefs.model_roots else None

    def _save_prefs(self) -> None:
        self.prefs.save(self.prefs_path)
