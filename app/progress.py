"""The conversion progress window: fed by the conversion's progress lines, closes or cancels."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.conversion import Outcome, Progress
from app.display import human_bytes


def outcome_text(outcome: Outcome) -> str:
    if outcome.cancelled:
        return "Cancelled: nothing was added to the cache."
    if outcome.error:
        return f"Failed: {outcome.error}"
    model = outcome.model
    how = "found in the cache" if model["cached"] else f"converted in {model['seconds']:.1f} s"
    return (f"Ready as '{model['id']}': {model['format']} {model['architecture']}, {model['quantization']}, "
            f"{human_bytes(model['size_bytes'])}, {how}. Pick it in the Model menu.")


class ProgressWindow(QWidget):
    def __init__(self, source_name: str, on_cancel: Callable[[], None]):
        super().__init__(None, Qt.WindowType.Window)
        self.on_cancel = on_cancel
        self.done = False
        self.last_progress: Progress | None = None
        self.setWindowTitle(f"Impetus: converting {source_name}")
        self.setMinimumWidth(460)
        self.title = QLabel(f"Converting <b>{source_name}</b> into an MLX checkpoint")
        self.stage = QLabel("Reading and checking the file…")
        self.stage.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, 0)  # a busy bar until the first count arrives
        self.button = QPushButton("Cancel")
        self.button.clicked.connect(self._button_clicked)
        self._lay_out()

    def show_progress(self, progress: Progress) -> None:
        self.last_progress = progress
        if not progress.total:
            return
        self.bar.setRange(0, progress.total)
        self.bar.setValue(progress.done)
        self.stage.setText(f"{progress.stage.capitalize()}: {progress.done} of {progress.total}")

    def finish(self, outcome: Outcome) -> None:
        self.done = True
        self.bar.setRange(0, 100)
        self.bar.setValue(0 if outcome.error else 100)
        self.stage.setText(outcome_text(outcome))
        self.stage.setStyleSheet("color: #c62828;" if outcome.error and not outcome.cancelled else "")
        self.button.setText("Close")
        self.adjustSize()  # the outcome may need more lines than the progress did

    def _lay_out(self) -> None:
        layout = QVBoxLayout(self)
        for widget in (self.title, self.bar, self.stage):
            layout.addWidget(widget)
        layout.addWidget(self.button, alignment=Qt.AlignmentFlag.AlignRight)

    def _button_clicked(self) -> None:
        if self.done:
            self.close()
        else:
            self.on_cancel()
