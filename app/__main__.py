"""Start the Impetus tray / menu-bar app: python -m app [--port P] [--no-server]."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from PySide6.QtCore import QLockFile, QSocketNotifier
from PySide6.QtWidgets import QApplication

from app.autostart import LoginItem
from app.preferences import FILE_NAME, Preferences
from app.supervisor import Supervisor
from app.tray import TrayApp
from settings import Settings

log = logging.getLogger("impetus.app")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app", description="The Impetus menu-bar / tray app.")
    parser.add_argument("--host", help="the server's address (remembered)")
    parser.add_argument("--port", type=int, help="the server's port (remembered)")
    parser.add_argument("--no-server", action="store_true", help="do not start the server at launch")
    return parser.parse_args(argv)


def configure_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), RotatingFileHandler(path, maxBytes=1_000_000, backupCount=2, encoding="utf-8")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def load_preferences(args: argparse.Namespace, path: Path) -> Preferences:
    prefs = Preferences.load(path)
    prefs.host = args.host or prefs.host
    prefs.port = args.port or prefs.port
    prefs.save(path)
    return prefs


def single_instance_lock(home: Path) -> QLockFile | None:
    """The lock held while this app runs; None when another instance for the same home holds it."""
    home.mkdir(parents=True, exist_ok=True)
    lock = QLockFile(str(home / "app.lock"))
    lock.setStaleLockTime(0)  # stale only when its process is gone, however old
    return lock if lock.tryLock(0) else None


def quit_on_signals(tray: TrayApp) -> tuple:
    """SIGTERM / SIGINT quit cleanly (stopping the server) even while Qt's event loop holds the thread."""
    reader, writer = socket.socketpair()
    for end in (reader, writer):
        end.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())  # wakes the event loop, so Python runs the handler at once
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: tray.quit())
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read)
    notifier.activated.connect(lambda: reader.recv(64))
    return notifier, reader, writer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    home = Settings.from_env().home
    configure_logging(home / "logs" / "app.log")
    prefs_path = home / FILE_NAME
    prefs = load_preferences(args, prefs_path)
    qt_app = QApplication(sys.argv[:1])
    qt_app.setApplicationName("Impetus")
    qt_app.setQuitOnLastWindowClosed(False)  # a tray app lives on with no window open
    lock = single_instance_lock(home)
    if lock is None:
        log.warning("Impetus is already running for %s; not starting a second one", home)
        return 0
    supervisor = Supervisor(home, prefs.host, prefs.port, home / "logs" / "server.log")
    tray = TrayApp(supervisor, prefs, prefs_path, LoginItem())
    _wakeup = quit_on_signals(tray)  # held so the notifier lives as long as the app
    tray.show()
    if prefs.start_server_on_launch and not args.no_server:
        tray.start_server()
    try:
        return qt_app.exec()
    finally:
        tray.shutdown()
        lock.unlock()


if __name__ == "__main__":
    sys.exit(main())
