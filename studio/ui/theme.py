"""Light and dark themes: a Fusion palette for the widgets (plots keep their white canvas, whose
colours were chosen for it)."""
from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

THEMES = ("light", "dark")


def apply_theme(name: str) -> None:
    app = QApplication.instance()
    if app is None:
        return
    if name == "dark":
        app.setStyle("Fusion")
        app.setPalette(_dark())
    elif getattr(app, "_studio_theme", "light") != "light":
        app.setPalette(app.style().standardPalette())
    app._studio_theme = name


def _dark() -> QPalette:
    palette = QPalette()
    role = QPalette.ColorRole
    for key, colour in ((role.Window, "#2b2b2b"), (role.WindowText, "#e6e6e6"),
                        (role.Base, "#1f1f1f"), (role.AlternateBase, "#2b2b2b"),
                        (role.ToolTipBase, "#3a3a3a"), (role.ToolTipText, "#e6e6e6"),
                        (role.Text, "#e6e6e6"), (role.Button, "#353535"),
                        (role.ButtonText, "#e6e6e6"), (role.BrightText, "#ff5555"),
                        (role.Link, "#6fa8ff"), (role.Highlight, "#3d6fb6"),
                        (role.HighlightedText, "#ffffff"), (role.PlaceholderText, "#8a8a8a")):
        palette.setColor(key, QColor(colour))
    palette.setColor(QPalette.ColorGroup.Disabled, role.Text, QColor("#7a7a7a"))
    palette.setColor(QPalette.ColorGroup.Disabled, role.ButtonText, QColor("#7a7a7a"))
    return palette
