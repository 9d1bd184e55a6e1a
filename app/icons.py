"""The tray icon for each state, drawn at run time: a different shape per state, not just a colour."""

from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPen, QPixmap

SIZE = 64
COLORS = {
    "stopped": "#8e8e93",
    "starting": "#ff9f0a",
    "running": "#30d158",
    "converting": "#0a84ff",
    "error": "#ff453a",
}


def state_icon(state: str) -> QIcon:
    return QIcon(state_pixmap(state))


def state_pixmap(state: str, size: int = SIZE) -> QPixmap:
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    DRAWINGS[state](painter, QColor(COLORS[state]), QRectF(4, 4, size - 8, size - 8))
    painter.end()
    return pixmap


def ring(painter: QPainter, color: QColor, box: QRectF) -> None:
    painter.setPen(QPen(color, box.width() / 8))
    painter.setBrush(Qt.BrushStyle.NoBrush)
    painter.drawEllipse(box.adjusted(4, 4, -4, -4))


def disc(painter: QPainter, color: QColor, box: QRectF) -> None:
    painter.setPen(Qt.PenStyle.NoPen)
    painter.setBrush(color)
    painter.drawEllipse(box)


def half_disc(painter: QPainter, color: QColor, box: QRectF) -> None:
    ring(painter, color, box)
    painter.setPen(Qt.PenStyle.NoPen)
    painter.setBrush(color)
    painter.drawPie(box.adjusted(4, 4, -4, -4), 90 * 16, 180 * 16)  # Qt angles are in 1/16 degree


def disc_with_dots(painter: QPainter, color: QColor, box: QRectF) -> None:
    disc(painter, color, box)
    painter.setBrush(QColor("white"))
    dot = box.width() / 7
    for step in (-1, 0, 1):
        centre_x = box.center().x() + step * 1.6 * dot
        painter.drawEllipse(QRectF(centre_x - dot / 2, box.center().y() - dot / 2, dot, dot))


def disc_with_mark(painter: QPainter, color: QColor, box: QRectF) -> None:
    disc(painter, color, box)
    painter.setBrush(QColor("white"))
    width = box.width() / 8
    left = box.center().x() - width / 2
    stem = QRectF(left, box.top() + box.height() / 5, width, box.height() * 2 / 5)
    painter.drawRoundedRect(stem, width / 2, width / 2)
    painter.drawEllipse(QRectF(left, box.bottom() - box.height() / 5 - width, width, width))


DRAWINGS = {
    "stopped": ring,
    "starting": half_disc,
    "running": disc,
    "converting": disc_with_dots,
    "error": disc_with_mark,
}
