"""Small layout helpers the views share."""
from __future__ import annotations

from PySide6.QtWidgets import QLayout, QVBoxLayout, QWidget


def column(*items) -> QWidget:
    """A margin-less widget stacking `items` top to bottom (a splitter pane, usually).

    Each item is a widget, a layout, or a (widget, stretch) pair.
    """
    pane = QWidget()
    layout = QVBoxLayout(pane)
    layout.setContentsMargins(0, 0, 0, 0)
    for item in items:
        item, stretch = item if isinstance(item, tuple) else (item, 0)
        if isinstance(item, QLayout):
            layout.addLayout(item, stretch)
        else:
            layout.addWidget(item, stretch)
    return pane
