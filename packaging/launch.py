"""The frozen app's entry point: the same `compression-studio` command (no argument: the
window; sub-commands: the CLI)."""
import sys

from studio.cli import main

if __name__ == "__main__":
    sys.exit(main())
