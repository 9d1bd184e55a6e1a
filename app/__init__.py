"""The Impetus menu-bar / tray app: runs the server, switches models, converts files, shows status.

The Qt-free parts (preferences, server process, API client, conversion runs, login item) are plain
modules; `tray`, `progress` and `icons` are the thin Qt layer on top, and `__main__` wires them up.
"""
