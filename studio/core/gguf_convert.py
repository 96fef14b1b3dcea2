"""De-quantize a GGUF file into a plain safetensors model folder.

The architectures `gguf_fast` covers are read in this process, as a job (no second import of
torch and transformers). Anything else goes through transformers' GGUF loader, in a child
process: that conversion is one long blocking call and needs about twice the model's memory while it
runs. Running it in a child process lets the user cancel it at any moment (the process is
killed, the half-written folder removed) and gives that memory back to the system when it
ends (`convert_with_transformers`; the child takes `gguf_fast` too with `convert`).

    python -m studio.core.gguf_convert FILE.gguf OUT_FOLDER
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studio.core.errors import ModelLoadError, StudioError
from studio.core.jobs import Job, Progress

log = logging.getLogger(__name__)


def in_process(path: Path) -> bool:
    """Whether `convert_job` reads `path` here (`gguf_fast`) rather than in a child process."""
    from studio.core import gguf_fast

    return gguf_fast.supported(path) and not os.environ.get("STUDIO_GGUF_SLOW_PATH")


def check_cache_room(folder: Path, needed: int, what: str) -> None:
    """A streamed first open must finish writing its cache before the model opens: refuse
    it before minutes of de-quantizing when the disk cannot hold the float32 weights."""
    root = folder.parent
    while not root.exists() and root != root.parent:
        root = root.parent
    free = shutil.disk_usage(root).free
    if needed > free:
        raise ModelLoadError(
            f"Opening {what} streamed writes its weights in float32 to the cache first: "
            f"{needed / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is free in {root}. "
            f"Free space there, or move the cache (Preferences > Cache folder, or "
            f"COMPRESSION_STUDIO_CACHE).")


def convert_job(path: Path, folder: Path, behind: bool = False) -> Job[object | None]:
    """The GGUF's cached folder: read here for the architectures `gguf_fast` covers (a job of
    its own, cancellable between tensors): with `behind`, read whole into memory and returned
    (a `gguf_fast.Dequantized`), the folder written on a thread after returning
    (`gguf_fast.write_behind`); without, written tensor by tensor, holding a few (returns
    None). Else in a child process, yielding progress until it ends (cancel kills it;
    returns None)."""
    from studio.core import gguf_fast

    _remove_stale_temporaries(folder)
    if in_process(path):
        try:
            if not behind:
                return (yield from gguf_fast.convert_fast_job(path, folder))
            done = yield from gguf_fast.dequantize_job(path)
            gguf_fast.write_behind(done, path, folder)
            return done
        except StudioError:
            raise
        except Exception as exc:   # what the child's last line of stderr said, as before
            raise ModelLoadError(f"{path.name} could not be de-quantized: "
                                 f"{type(exc).__name__}: {exc}") from exc
    started = time.perf_counter()
    # stderr goes to a file, not a pipe: a chatty child would block on a full pipe.
    errors_file = tempfile.TemporaryFile("w+")
    # Offline: the child reads a local file; hub look-ups only cost time (seconds each).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "studio.core.gguf_convert", str(path),
                              str(folder)], stdout=subprocess.DEVNULL, stderr=errors_file,
                             text=True, env=env)
    try:
        while child.poll() is None:
            yield Progress(1, 4, f"De-quantizing {path.name} ({time.perf_counter() - started:.0f} s; "
                                 f"first open only, cached after)")
            try:
                child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if child.poll() is None:  # cancelled: stop the child and leave no half-written folder
            child.kill()
            child.wait()
            _remove_stale_temporaries(folder)
    errors_file.seek(0)
    errors = errors_file.read()
    errors_file.close()
    if child.returncode != 0 or not (folder / "config.json").is_file():
        last = errors.strip().splitlines()[-1] if errors.strip() else f"exit status {child.returncode}"
        raise ModelLoadError(f"{path.name} could not be de-quantized: {last}")


def convert(path: Path, folder: Path) -> None:
    """The conversion itself (runs in the child process)."""
    from studio.core import gguf_fast

    if gguf_fast.supported(path) and not os.environ.get("STUDIO_GGUF_SLOW_PATH"):
        gguf_fast.convert_fast(path, folder)
    else:
        convert_with_transformers(path, folder)


def convert_with_transformers(path: Path, folder: Path) -> None:
    """transformers' own GGUF loader: a float model built, loaded and saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from studio.core.files import atomic_dir

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    # The loaded model is plain float32; drop the GGUF marker so it saves as an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        except Exception as exc:  # a GGUF without a usable vocabulary still gives weights
            log.warning("no tokenizer from %s: %s", path.name, exc)


def _remove_stale_temporaries(folder: Path) -> None:
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


if __name__ == "__main__":
    try:
        convert(Path(sys.argv[1]), Path(sys.argv[2]))
    except Exception as exc:  # the parent shows the last line of stderr to the user
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
