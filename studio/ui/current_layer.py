"""The one current layer of the window, with the back / forward history of visited layers.

Every view shows this layer and sets it when the user picks a layer in its own table or plot;
no view asks another. Like a browser's history: choosing a new layer after going back drops
the forward part.
"""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal

HISTORY_MAX = 100


class CurrentLayer(QObject):
    changed = Signal(str)          # the new current layer's name
    historyChanged = Signal()      # can_back / can_forward may have changed

    def __init__(self) -> None:
        super().__init__()
        self._visited: list[str] = []
        self._at = -1

    @property
    def name(self) -> str | None:
        return self._visited[self._at] if self._at >= 0 else None

    @property
    def can_back(self) -> bool:
        return self._at > 0

    @property
    def can_forward(self) -> bool:
        return self._at < len(self._visited) - 1

    def set(self, name: str) -> None:
        """Make `name` current (a new visit); nothing happens when it already is."""
        if not name or name == self.name:
            return
        self._visited = self._visited[:self._at + 1] + [name]
        if len(self._visited) > HISTORY_MAX:
            self._visited = self._visited[-HISTORY_MAX:]
        self._at = len(self._visited) - 1
        self.historyChanged.emit()
        self.changed.emit(name)

    def back(self) -> None:
        if self.can_back:
            self._at -= 1
            self.historyChanged.emit()
            self.changed.emit(self.name)

    def forward(self) -> None:
        if self.can_forward:
            self._at += 1
            self.historyChanged.emit()
            self.changed.emit(self.name)

    def clear(self) -> None:
        """A new model: no current layer and no history (its layers are other layers)."""
        self._visited, self._at = [], -1
        self.historyChanged.emit()
