"""Kill -9 and full-disk trials of the studio's saves (a variant folder, a recipe file, a
session, an export).

A child process saves generation after generation to one target, the real save code
(`variant.save_variant`, `Plan.save`, `session_file.save_session`, `export_job`); the parent kills it with SIGKILL at a random moment and
checks that the target is one complete generation (every file of a variant from the same
save), then saves again itself and checks no temporary is left beside the target. A
full disk is simulated in a child with RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with
EFBIG): the save must end in a StudioError and leave the previous generation intact.

The variant is synthetic (a few coded layers on a plain torch module), so a child starts in
the time torch takes to import, without transformers or a model. An export needs a real
model: a tiny Llama, opened once per process before any saver is forked (the savers inherit
it), exported as compressed-tensors (written, re-opened by transformers and verified, as the
export dialog does); its generations alternate between W4 g32 and W4 per-channel, so a folder
mixing two saves shows in its tensors' shapes.

Used by tests/core/test_crash_safe_writes.py and benchmarks/crash_writes.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("variant", "plan", "session", "export")
# Kills land at a random moment this many seconds after a saver's first save (an export, with
# its re-opening and checks, takes seconds; the others well under one).
KILL_WITHIN = {"export": 3.0}
_export_handle = None


def synthetic_variant(generation: int):
    import torch
    from torch import nn

    from studio.core.plan import Plan, QuantSpec
    from studio.core.quant.grid import QTensor
    from studio.core.variant import Variant

    gen = torch.Generator().manual_seed(0)
    spec = QuantSpec(bits=4, group_size=128)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(4)])
    qtensors = {str(i): QTensor(torch.randint(0, 16, (512, 512), dtype=torch.uint8, generator=gen),
                                torch.full((512, 4), float(generation)), torch.zeros(512, 4), 4, 128)
                for i in range(4)}
    return Variant(name=f"gen-{generation}", base_source="synthetic", architecture="Sequential",
                   plan=Plan(default=spec, architecture=f"gen-{generation}"), model=model,
                   qtensors=qtensors, specs={n: spec for n in qtensors},
                   floats={"marker": torch.full((1024,), float(generation))})


def synthetic_plan(generation: int):
    from studio.core.plan import Plan, QuantSpec, Rule

    rules = tuple(Rule(f"model.layers.{i}.mlp.down_proj", QuantSpec(bits=2 + i % 7))
                  for i in range(400))
    return Plan(default=QuantSpec(bits=4), rules=rules, architecture=f"gen-{generation}")


def synthetic_session(generation: int):
    """A session of a stand-in model (no weights to fingerprint), with a variant and arrays."""
    from types import SimpleNamespace

    import numpy as np

    from studio.core.session import Session

    handle = SimpleNamespace(source="synthetic", architecture="Sequential", quantizable=[])
    return Session(handle=handle, plan=synthetic_plan(generation),
                   results={"marker": np.full(100_000, generation, dtype=np.float32)},
                   variants={"v": synthetic_variant(generation)},
                   runs=[{"generation": generation}])


def export_handle():
    """The tiny Llama exports are made from, opened once per process."""
    global _export_handle
    if _export_handle is None:
        import atexit
        import shutil
        import tempfile

        from studio.core.jobs import run
        from studio.core.models import open_model_job
        from tests.tiny_models import make_tiny_model, tiny_tokenizer

        root = Path(tempfile.mkdtemp(prefix="studio-crash-model-"))
        atexit.register(shutil.rmtree, root, True)   # (forked savers leave by os._exit)
        _export_handle = run(open_model_job(make_tiny_model("llama", root / "llama",
                                                            tiny_tokenizer())))
    return _export_handle


def synthetic_export(generation: int, target: Path) -> None:
    from studio.core.export.job import export_job
    from studio.core.jobs import run
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job

    handle = export_handle()
    spec = QuantSpec(bits=4, group_size=32 if generation % 2 == 0 else -1)
    variant = run(quantize_job(handle, Plan(spec), None, None, f"gen-{generation}"))
    run(export_job(variant, handle, "compressed-tensors", target, force=True))


def save(kind: str, target: Path, generation: int) -> None:
    if kind == "export":
        synthetic_export(generation, target)
    elif kind == "variant":
        from studio.core.variant import save_variant
        save_variant(synthetic_variant(generation), target)
    elif kind == "session":
        from studio.core.session_file import save_session
        save_session(synthetic_session(generation), target)
    else:
        synthetic_plan(generation).save(target)


def generation_of(kind: str, target: Path) -> int:
    """The generation the target holds; AssertionError when it is not one complete save."""
    from safetensors.torch import load_file

    from studio.core.plan import Plan
    from studio.core.variant import read_variant_meta

    assert target.exists(), f"{target} is missing"
    if kind == "export":
        from safetensors import safe_open

        gen = int(json.loads((target / "report.json").read_text())["variant"]["name"][4:])
        recipe = json.loads((target / "recipe.json").read_text())
        assert recipe["variant"] == f"gen-{gen}", "recipe.json is from another save"
        with safe_open(str(target / "model.safetensors"), "pt") as f:
            scale = f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_shape()
        assert (scale[1] == 1) == (gen % 2 == 1), "model.safetensors is from another save"
        return gen
    if kind == "session":
        from studio.core.session_file import read_session
        doc, arrays = read_session(target)
        gen = doc["runs"][0]["__dict__"][0][1]
        key = doc["results"]["marker"]["__array__"]
        assert int(arrays[key][0]) == gen and int(arrays[key][-1]) == gen, "arrays of another save"
        assert doc["plan"]["architecture"] == f"gen-{gen}", "plan of another save"
        assert generation_of("variant", target / doc["variants"]["v"]) == gen, "variant of another save"
        return gen
    if kind == "plan":
        plan = Plan.load(target)
        assert len(plan.rules) == 400
        return int(plan.architecture.split("-")[1])
    meta = read_variant_meta(target)
    gen = int(meta["name"].split("-")[1])
    recipe = Plan.load(target / "recipe.json")
    floats = load_file(str(target / "floats.safetensors"))
    packed = load_file(str(target / "quantized.safetensors"))
    assert recipe.architecture == f"gen-{gen}", "recipe.json is from another save"
    assert int(floats["marker"][0]) == gen, "floats.safetensors is from another save"
    assert all(int(packed[f"{i}.scale"][0, 0]) == gen for i in range(4)), \
        "quantized.safetensors is from another save"
    return gen


def temporaries(target: Path) -> list[Path]:
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith(f".{target.name}.") and p != target)


def _saver(kind: str, target: Path, ready: int) -> None:
    """Save generations 1, 2, 3... to `target` forever; write a byte to `ready` after the first."""
    generation = 1
    save(kind, target, generation)
    os.write(ready, b"r")
    while True:
        generation += 1
        save(kind, target, generation)


def zygote() -> None:
    """Imports the studio once, then forks one saver per request ("KIND TARGET" on stdin,
    answered with the saver's pid once its first save is in place; "reap PID" waits for a
    killed saver, so its pid is free and its temporaries count as a dead writer's)."""
    import safetensors.torch  # noqa: F401
    import studio.core.variant  # noqa: F401

    # Answers go to the parent on the original stdout; anything a library prints (an export's
    # progress bars) goes to stderr, where it cannot be mistaken for an answer.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        words = line.split(maxsplit=1)
        if "export" in line.split():
            export_handle()   # before the fork: every saver inherits the opened model
        if words[0] == "reap":
            os.waitpid(int(words[1]), 0)
            print("reaped", file=answers, flush=True)
            continue
        if words[0] == "full":
            print(json.dumps(_disk_full_fork(*words[1].split())), file=answers, flush=True)
            continue
        if words[0] == "phase":
            print(json.dumps(_phase_fork(*words[1].split())), file=answers, flush=True)
            continue
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(ready_r)
                _saver(words[0], Path(words[1].strip()), ready_w)
            finally:
                os._exit(status)
        os.close(ready_w)
        ok = os.read(ready_r, 1) == b"r"
        os.close(ready_r)
        print(pid if ok else "failed", file=answers, flush=True)


class Savers:
    """A zygote process: each trial forks a saver from it (no import per trial)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.fuzz.crash import zygote; zygote()"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def kill_trial(savers: Savers, kind: str, target: Path, delay: float) -> dict:
    """Start a saver, kill it (SIGKILL) `delay` s after its first save, check what is left."""
    answer = savers.ask(f"{kind} {target}")
    if not answer.isdigit():
        raise AssertionError(f"the saver failed: {answer}")
    time.sleep(delay)
    os.kill(int(answer), signal.SIGKILL)
    assert savers.ask(f"reap {answer}") == "reaped"
    generation = generation_of(kind, target)
    left = temporaries(target)
    save(kind, target, 0)  # the next save cleans what the kill left
    assert generation_of(kind, target) == 0
    after = temporaries(target)
    return {"generation": generation, "leftovers": len(left), "after_next_save": len(after)}


def _disk_full_fork(kind: str, limit: str, target: str) -> list:
    """[exit status, message] of a save of generation 99 in a forked child whose file-size
    limit is `limit` bytes (2: a StudioError, whose message is returned)."""
    import resource

    from studio.core.errors import StudioError

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))
            try:
                save(kind, Path(target), 99)
                status = 0
            except StudioError as exc:
                os.write(write_end, str(exc).encode())
                status = 2
            except BaseException as exc:
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return [os.waitstatus_to_exitcode(status), b"".join(chunks).decode()]


# Where a save can be killed, each made certain by killing the saver from inside the save code:
# (phase, kind) -> the generation the target must then hold (5 before the save, 6 after).
PHASES = {
    ("variant", "writing"): 5,      # after the first tensor file is written into the temporary
    ("variant", "before-swap"): 5,  # everything written and synced, not yet in place
    ("variant", "after-swap"): 6,   # in place, the old folder not yet removed
    ("session", "writing"): 5,      # a session folder is written as a variant's is
    ("session", "before-swap"): 5,
    ("session", "after-swap"): 6,
    ("export", "writing"): 5,       # an export folder too, before its re-opening and checks
    ("export", "before-swap"): 5,
    ("export", "after-swap"): 6,
    ("plan", "before-rename"): 5,   # the temporary file written and synced
    ("plan", "after-rename"): 6,    # renamed, the folder not yet synced
}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _phase_fork(kind: str, phase: str, target: str) -> list:
    """[exit status, note] of a save of generation 6 killed by SIGKILL at `phase`."""
    pid = os.fork()
    if pid == 0:
        try:
            import safetensors.torch

            from studio.core import files
            if phase == "writing":
                original, calls = safetensors.torch.save_file, []

                def save_file(*args, **kwargs):
                    original(*args, **kwargs)
                    calls.append(1)
                    _die()
                safetensors.torch.save_file = save_file
                # an export writes its model file a tensor at a time (safetensors_stream)
                from studio.core.export import safetensors_stream
                streamed_write = safetensors_stream.write

                def write(*args, **kwargs):
                    yield from streamed_write(*args, **kwargs)
                    _die()
                safetensors_stream.write = write
            elif phase == "before-swap":
                files._swap_into_place = lambda new, target: _die()
            elif phase == "after-swap":
                swap = files._swap_into_place
                files._swap_into_place = lambda new, target: (swap(new, target), _die())
            elif phase == "before-rename":
                files.os.replace = lambda a, b: _die()
            elif phase == "after-rename":
                replace = os.replace
                files.os.replace = lambda a, b: (replace(a, b), _die())
            save(kind, Path(target), 6)
        finally:
            os._exit(3)  # reached only when the kill did not happen
    _, status = os.waitpid(pid, 0)
    return [os.waitstatus_to_exitcode(status), ""]


def phase_trial(savers: Savers, kind: str, phase: str, target: Path) -> dict:
    """Kill a save of generation 6 over generation 5 at `phase`; what was left, and whether
    the next save cleans it."""
    save(kind, target, 5)
    status, _ = json.loads(savers.ask(f"phase {kind} {phase} {target}"))
    generation = generation_of(kind, target)
    left = temporaries(target)
    save(kind, target, 0)
    return {"status": status, "generation": generation, "leftovers": len(left),
            "after_next_save": len(temporaries(target))}


def disk_full_trial(savers: Savers, kind: str, target: Path, limit: int) -> tuple[int, str]:
    """(exit status, message) of a save of generation 99 under a file-size limit of `limit`
    (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG)."""
    status, message = json.loads(savers.ask(f"full {kind} {limit} {target}"))
    return status, message
