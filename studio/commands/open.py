"""compression-studio open MODEL: the window, opened on a model."""
from __future__ import annotations

NAME = "open"
HELP = "open the studio window on a model"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="a model folder, a .gguf file, or 'demo'")
    parser.add_argument("--session", metavar="FOLDER",
                        help="restore a saved session (File > Save session) instead")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="save the window to PNG once the model is open (without MODEL: "
                             "once the window is ready), then quit")
    parser.add_argument("--tab", help="with --screenshot: the tab to show (e.g. Layers)")


def run(args) -> int:
    from studio.core.errors import StudioError
    from studio.ui.app import main as gui_main

    if args.model and args.session or not (args.model or args.session or args.screenshot):
        raise StudioError("Give a MODEL or --session FOLDER (one of them).")
    if args.session:
        from studio.core.session_file import read_session
        read_session(args.session)  # a bad session is refused here, before any window opens
    return gui_main(args.model, screenshot=args.screenshot, tab=args.tab, session=args.session)
