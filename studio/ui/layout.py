"""Small layout helpers the views share."""
from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize, Qt
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


def labelled(text: str, *widgets) -> QWidget:
    """A label and its fields kept together on one line of a FlowLayout."""
    from PySide6.QtWidgets import QHBoxLayout, QLabel

    pair = QWidget()
    layout = QHBoxLayout(pair)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(QLabel(text))
    for widget in widgets:
        layout.addWidget(widget)
    return pair


class FlowLayout(QLayout):
    """Widgets left to right, wrapping onto the next row when the width runs out (Qt's flow
    layout example): a toolbar row that fits a 1366-pixel laptop screen instead of setting the
    window's minimum width. A stretch item (`addStretch`) is accepted and ignored."""

    def __init__(self, parent=None, spacing: int = 6) -> None:
        super().__init__(parent)
        self._items: list = []
        self.setSpacing(spacing)
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item) -> None:  # noqa: N802 (Qt API)
        self._items.append(item)

    def addStretch(self, _stretch: int = 0) -> None:  # noqa: N802 (QBoxLayout's API)
        pass

    def addSpacing(self, _size: int) -> None:  # noqa: N802 (QBoxLayout's API)
        pass

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int):  # noqa: N802 (Qt API)
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int):  # noqa: N802 (Qt API)
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def expandingDirections(self):  # noqa: N802 (Qt API)
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:  # noqa: N802 (Qt API)
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802 (Qt API)
        return self._place(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect) -> None:  # noqa: N802 (Qt API)
        super().setGeometry(rect)
        self._place(rect, move=True)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        """One row: every item side by side."""
        items = [i for i in self._items if not i.isEmpty()]
        width = sum(i.sizeHint().width() for i in items) + self.spacing() * max(0, len(items) - 1)
        height = max((i.sizeHint().height() for i in items), default=0)
        m = self.contentsMargins()
        return QSize(width + m.left() + m.right(), height + m.top() + m.bottom())

    def minimumSize(self) -> QSize:  # noqa: N802 (Qt API)
        """The widest single item: everything else can wrap."""
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _place(self, rect, move: bool) -> int:
        """Lay the items out in rows (each item centred in its row's height); returns the
        height used."""
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        rows: list[list] = [[]]
        x = area.x()
        for item in self._items:
            if item.isEmpty():
                continue
            hint = item.sizeHint()
            hint.setWidth(min(hint.width(), max(area.width(), item.minimumSize().width())))
            if x + hint.width() > area.right() + 1 and rows[-1]:
                rows.append([])
                x = area.x()
            rows[-1].append((item, hint, x))
            x += hint.width() + self.spacing()
        y = area.y()
        for row in rows:
            height = max((hint.height() for _, hint, _ in row), default=0)
            if move:
                for item, hint, left in row:
                    item.setGeometry(QRect(QPoint(left, y + (height - hint.height()) // 2), hint))
            y += height + self.spacing()
        return y - self.spacing() - rect.y() + m.bottom()
