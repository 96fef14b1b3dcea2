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


# --- Preferences: one table of defaults; the Preferences dialog edits these keys -------------
DEFAULTS = {
    "threads": 0,                 # 0: torch's own choice (every core)
    "cache_folder": "",           # "": the studio's default cache folder
    "calibration_text": "",       # "": the built-in text
    "calibration_windows": 64,
    "quick_eval": True,           # evaluate every new variant briefly
    "quick_eval_windows": 8,
    "quick_eval_seqlen": 256,
    "theme": "light",
    "heartbeat": False,           # debug: measure event-loop stalls, shown in the status bar
}


def get(key: str):
    """A preference, typed as its default (QSettings' INI file gives strings back)."""
    default = DEFAULTS[key]
    value = settings().value(f"preferences/{key}", default)
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            return default
    return str(value)


def put(values: dict) -> None:
    store = settings()
    for key, value in values.items():
        if key not in DEFAULTS:
            raise KeyError(key)
        store.setValue(f"preferences/{key}", value)
    store.sync()


def quick_eval() -> tuple[int, int]:
    """(windows, tokens per window) of the quick evaluation a new variant gets."""
    return get("quick_eval_windows"), get("quick_eval_seqlen")


def calibration_text() -> str | None:
    """The default calibration text file from Preferences (None: the built-in text, also when
    the file chosen once is gone: the views then say "built-in" rather than fail later)."""
    path = get("calibration_text")
    return path if path and Path(path).is_file() else None


def threads() -> int | None:
    """Torch threads for jobs (None: torch's own choice)."""
    return get("threads") or None
