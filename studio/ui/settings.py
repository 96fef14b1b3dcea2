"""Persistent preferences (recent models, window geometry) in one INI file.

The file lives in COMPRESSION_STUDIO_CONFIG (tests point it at a temporary folder) or Qt's
standard config location.
"""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths

RECENT_MAX = 10


def settings() -> QSettings:
    folder = os.environ.get("COMPRESSION_STUDIO_CONFIG") or QStandardPaths.writableLocation(
        QStandardPaths.StandardLocation.AppConfigLocation)
    return QSettings(str(Path(folder) / "compression-studio.ini"), QSettings.Format.IniFormat)


def recent_models() -> list[str]:
    value = settings().value("recent_models", [])
    if isinstance(value, str):  # QSettings returns a bare string for a one-item list
        value = [value]
    return [v for v in value if v]


def add_recent_model(source: str) -> None:
    items = [source] + [v for v in recent_models() if v != source]
    store = settings()
    store.setValue("recent_models", items[:RECENT_MAX])
    store.sync()
