"""The CLI's sub-commands, one module each (see studio/cli.py)."""
