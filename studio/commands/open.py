"""compression-studio open MODEL: the window, opened on a model."""
from __future__ import annotations

from studio.commands.common import add_model_argument

NAME = "open"
HELP = "open the studio window on a model"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--screenshot", metavar="PNG",
                        help="save the window to PNG once the model is open, then quit")
    parser.add_argument("--tab", help="with --screenshot: the tab to show (e.g. Layers)")


def run(args) -> int:
    from studio.ui.app import main as gui_main
    return gui_main(args.model, screenshot=args.screenshot, tab=args.tab)
