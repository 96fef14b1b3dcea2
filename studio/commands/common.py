"""What every sub-command shares: running a job with a progress line on stderr, JSON output."""
from __future__ import annotations

import json
import sys
from typing import Any

from studio.core.jobs import Job, Progress, run


class StderrProgress:
    """A one-line progress display on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        line = f"[{100 * p.fraction:5.1f}%] {p.message}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(len(self.last)))
            self.last = line[:120]
        elif p.message != self.last:
            sys.stderr.write(line + "\n")
            self.last = p.message
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")


def run_with_progress(job: Job, quiet: bool = False) -> Any:
    bar = StderrProgress(quiet)
    try:
        return run(job, bar)
    finally:
        bar.close()


def open_model(source: str, quiet: bool = False):
    from studio.core.models import open_model_job
    return run_with_progress(open_model_job(source), quiet)


def print_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    json.dump(obj, sys.stdout, indent=2, default=_jsonable)
    sys.stdout.write("\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def add_model_argument(parser, help_text: str = "a model folder, a .gguf file, or 'demo'") -> None:
    parser.add_argument("model", metavar="MODEL", help=help_text)


def add_calibration_arguments(parser, windows: int, seqlen: int = 512,
                              what: str = "calibration") -> None:
    """--calib, --windows, --seqlen, --seed: the same four options on every command that reads text."""
    parser.add_argument("--calib", metavar="FILE", help=f"{what} text (default: built-in)")
    parser.add_argument("--windows", type=int, default=windows,
                        help=f"{what} windows (default {windows})")
    parser.add_argument("--seqlen", type=int, default=seqlen,
                        help=f"tokens per window (default {seqlen})")
    parser.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    add_bos_argument(parser)


def add_bos_argument(parser, flag: str = "--bos") -> None:
    """Whether every text window starts with the model's BOS token (text.py explains)."""
    from studio.core.text import BOS_SETTINGS

    parser.add_argument(flag, default="auto", choices=BOS_SETTINGS,
                        help="start every window with the BOS token: auto (as the model's "
                             "tokenizer / GGUF asks, default), yes, or no")
