"""The results chart, `bench/results.png`: one panel of horizontal bars a figure, one colour an engine,
drawn with Qt offscreen (PySide6 is a dependency already; no matplotlib needed)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.harness import fmt
from bench.serving.results import Result

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"]


def chart(results: list[Result], levels: list[int], caption: str, path: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841  (fonts need an application)
    ok = [r for r in results if not r.error]
    panels = [
        ("prefill tok/s", [(r.label, r.median("prefill_tps")) for r in ok]),
        ("decode tok/s (one stream)", [(r.label, r.median("decode_tps")) for r in ok]),
        ("aggregate tok/s by concurrent clients",
         [(f"{r.label} ×{n}", r.aggregate[str(n)]) for r in ok for n in levels if str(n) in r.aggregate]),
        ("TTFT s, cold → shared prefix", [(f"{r.label} {k}", r.prefix.get(f"{k}_ttft")) for r in ok if r.prefix for k in ("cold", "cached")]),
        ("peak RSS MiB", [(r.label, r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else None) for r in ok]),
    ]
    draw_panels(panels, [r.label for r in ok], caption, path)


def draw_panels(panels: list, labels: list[str], caption: str, path: Path) -> None:
    """Each panel's bars scaled to its largest; a bar's colour is that of the engine its name starts with."""
    from PySide6.QtCore import QRectF, Qt
    from PySide6.QtGui import QColor, QFont, QImage, QPainter

    bar, gap, width, label_width = 18, 4, 1400, 520
    height = sum(40 + len(bars) * (bar + gap) + 20 for _, bars in panels) + 50
    image = QImage(width, height, QImage.Format_ARGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    painter.setFont(QFont("DejaVu Sans", 9))
    y = 20
    for title, bars in panels:
        painter.setPen(QColor("black"))
        painter.drawText(QRectF(10, y, width, 24), Qt.AlignLeft | Qt.AlignVCenter, title)
        y += 36
        top = max((v for _, v in bars if v), default=1.0)
        for name, value in bars:
            colour = QColor(PALETTE[next(i for i, l in enumerate(labels) if name.startswith(l)) % len(PALETTE)])
            painter.setPen(QColor("black"))
            painter.drawText(QRectF(10, y, label_width - 20, bar), Qt.AlignRight | Qt.AlignVCenter, name)
            length = (width - label_width - 120) * (value or 0) / top
            painter.fillRect(QRectF(label_width, y, length, bar), colour)
            painter.drawText(QRectF(label_width + length + 6, y, 110, bar), Qt.AlignLeft | Qt.AlignVCenter, fmt(value, 2))
            y += bar + gap
        y += 20
    painter.setPen(QColor("dimgray"))
    painter.drawText(QRectF(10, y, width - 20, 40), Qt.AlignLeft | Qt.TextWordWrap, caption)
    painter.end()
    if not image.save(str(path)):
        raise OSError(f"could not write {path}")
