"""The frozen app's entry point: the same `compression-studio` command (no argument: the
window; sub-commands: the CLI).

The studio runs some work in a child process as `sys.executable -m MODULE ...` (the GGUF
de-quantization, so that it can be cancelled); in the frozen app `sys.executable` is this
program, so `-m MODULE` is honoured here as Python would."""
import runpy
import sys

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [sys.argv[0], *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        sys.exit(0)
    from studio.cli import main

    sys.exit(main())
