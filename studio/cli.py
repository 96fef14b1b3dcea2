"""`compression-studio`: no arguments opens the window; sub-commands run the headless core.

Each sub-command lives in its own module under `studio/commands/` (NAME, HELP,
add_arguments(parser), run(args) -> exit status) and is listed in COMMANDS below; plugins add
theirs through `studio.core.plugins`.
Exit status: 0 success, 2 bad input (one line on stderr), 1 internal error.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from studio import __version__
from studio.core.errors import Cancelled, StudioError

COMMANDS = ("open", "inspect", "analyze", "quantize", "plan", "eval", "bench", "compare",
            "export", "methods")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(commands: tuple[str, ...] = COMMANDS, plugins: bool = True
                 ) -> argparse.ArgumentParser:
    parser = _Parser(prog="compression-studio",
                     description="Analyse, quantize, benchmark and export language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--weights", choices=("auto", "memory", "stream"),
                        help="hold every weight in float32 (memory), keep them in their "
                             "safetensors files and read each layer as it runs (stream), or "
                             "stream when float32 would take over half the free memory "
                             "(auto, the default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in commands:
        _add_command(sub, importlib.import_module(f"studio.commands.{name}"))
    if not plugins:
        return parser
    from studio.core.plugins import discover

    for module_name in discover().commands:
        try:
            _add_command(sub, importlib.import_module(module_name))
        except Exception as exc:  # a broken plugin command must not take the CLI down
            logging.getLogger(__name__).warning("plugin command %s skipped: %s", module_name, exc)
    return parser


def wants_window(argv: list[str]) -> bool:
    """True when `argv` asks for the window: no command, or `open` (after global options)."""
    rest = list(argv)
    while rest and (rest[0] in ("-v", "--verbose", "--weights") or
                    rest[0].startswith("--weights=")):
        rest = rest[2:] if rest[0] == "--weights" else rest[1:]
    return not rest or rest[0] == "open"


def _add_command(sub, module) -> None:
    command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
    module.add_arguments(command)
    command.set_defaults(run=module.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The window must show within a second: its commands skip importing every other command
    # (and torch under them) just to parse the arguments.
    parser = build_parser(("open",), plugins=False) if wants_window(argv) else build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.weights:   # read by every open, the base model of a VARIANT's included
        os.environ["COMPRESSION_STUDIO_WEIGHTS"] = args.weights
    if args.command is None:
        from studio.ui.app import main as gui_main  # Qt only when a window is wanted
        return gui_main()
    try:
        return int(args.run(args) or 0)
    except StudioError as exc:
        print(f"compression-studio {args.command}: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print(f"compression-studio {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
