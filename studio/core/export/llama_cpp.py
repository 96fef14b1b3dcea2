"""Run a written GGUF in llama.cpp itself (through the `cyllama` binding, when installed).

transformers' GGUF loader de-quantizes to float32 and computes in float32; llama.cpp keeps the
blocks and quantizes activations (Q8_0/Q8_1) in its CPU dot products, so its logits differ
slightly from the loader's: this is how to measure what llama.cpp users will get (its
perplexity on the studio's windows, its agreement with the variant).

llama.cpp runs in a child process (`Worker`, `llama_worker.py`): it aborts its process when one
of its own checks fails, and that must not close the studio. One thread and a passive OpenMP
wait policy by default: the machine's cores are shared, and a spinning OpenMP pool starves torch.

The benchmark's llama.cpp backend (`Generator`) times prefill and greedy decode here with the
same prompt ids and lengths as the torch path; `build_info` says which build produced a figure.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress, run


INSTALL = "pip install 'compression-studio[llama-cpp]'"


def available() -> bool:
    try:
        _binding()
    except ImportError:
        return False
    return True


def build_info() -> dict:
    """Which llama.cpp produced a figure: binding, llama.cpp and ggml versions, the CPU and the
    SIMD flags it offers (the wheel's own compile flags are not exposed by the binding)."""
    import importlib.metadata

    cy = _binding()
    info = {"binding": f"cyllama {importlib.metadata.version('cyllama')}"}
    try:
        from cyllama._internal import build_config
        versions = build_config.get().get("versions", {})
        info["llama_cpp"] = versions.get("llama_cpp_version")
    except Exception:  # an older or newer wheel without that file: the rest still says enough
        pass
    info["ggml"] = f"{cy.ggml_version()} ({cy.ggml_commit()})"
    info["cpu_flags"] = cpu_simd_flags()
    info["machine"] = platform.machine()
    return info


def cpu_simd_flags() -> str:
    """The host CPU's vector extensions (from /proc/cpuinfo where there is one)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile")
    flags = set(line.split(":", 1)[-1].split())
    return " ".join(f for f in wanted if f in flags) or "none found"


def _binding():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read when the library loads
    import cyllama.llama.llama_cpp as binding

    return binding


WORKER_SCRIPT = Path(__file__).with_name("llama_worker.py")


class Worker:
    """llama.cpp in a child process (`llama_worker.py`), with `path` opened in it when given.

    llama.cpp aborts the process on a failed check; in a child, that ends the child only, and
    the request that was running raises a StudioError with llama.cpp's last words. A request
    left unfinished (its job cancelled) stops the child: nothing half-read stays in the pipe.
    """

    def __init__(self, path: str | Path | None, threads: int = 1, n_ctx: int = 64) -> None:
        self.name = Path(path).name if path is not None else "llama.cpp"
        self.errors = tempfile.TemporaryFile()
        environment = {**os.environ}
        environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.child = subprocess.Popen([sys.executable, str(WORKER_SCRIPT)], env=environment,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self.errors)
        self.close = weakref.finalize(self, _stop, self.child, self.errors)
        if path is not None:
            self.n_vocab = self.call("load", op="open", path=str(path), threads=threads,
                                     n_ctx=n_ctx)[0]["n_vocab"]

    def call(self, doing: str, **request) -> tuple[dict, bytearray | None]:
        """Send one request and return its one reply (and payload)."""
        *_, last = self.replies(doing, **request)
        return last

    def replies(self, doing: str, **request) -> Iterator[tuple[dict, bytearray | None]]:
        """Send one request and yield its replies: progress messages, then the final one."""
        finished = False
        try:
            try:
                self._write(json.dumps(request).encode())
            except (BrokenPipeError, OSError):
                raise self._stopped(doing) from None
            while True:
                frame = self._read()
                if frame is None:
                    raise self._stopped(doing)
                message = json.loads(frame)
                if "error" in message:
                    finished = True
                    raise StudioError(f"llama.cpp could not {doing} {self.name}: "
                                      f"{message['error']}")
                payload = self._read() if "bytes" in message else None
                if "progress" not in message:
                    finished = True
                    yield message, payload
                    return
                yield message, payload
        finally:
            if not finished:
                self.close()

    def _write(self, data: bytes) -> None:
        self.child.stdin.write(struct.pack("<I", len(data)) + data)
        self.child.stdin.flush()

    def _read(self) -> bytearray | None:
        head = self.child.stdout.read(4)
        if len(head) < 4:
            return None
        (size,) = struct.unpack("<I", head)
        data = bytearray(size)   # writable, so NumPy and torch can take it without a copy
        view, got = memoryview(data), 0
        while got < size:
            count = self.child.stdout.readinto(view[got:])
            if not count:
                return None
            got += count
        return data

    def _stopped(self, doing: str) -> StudioError:
        try:
            code = self.child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        how = (f"signal {signal.Signals(-code).name}" if code and code < 0 else
               f"exit status {code}" if code is not None else "no reply")
        self.errors.seek(0)
        lines = self.errors.read().decode(errors="replace").strip().splitlines()
        said = next((line for line in reversed(lines) if "GGML_ASSERT" in line or "error" in line),
                    lines[-1] if lines else "")
        self.close()
        return StudioError(f"llama.cpp stopped while trying to {doing} {self.name} ({how})"
                           + (f": {said.strip()}" if said else "") +
                           ". It ran in a separate process; the studio and your work are unaffected.")


def _stop(child: subprocess.Popen, errors) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    for stream in (child.stdin, child.stdout):
        try:
            stream.close()
        except OSError:
            pass
    errors.close()


class Generator:
    """A GGUF opened in llama.cpp for timed greedy generation (the benchmark's llama.cpp backend).

    `timed_generation(prompt, new_tokens, progress)` has the torch path's contract: a job that
    returns (prefill seconds, decode seconds), timed inside the llama.cpp process (see
    `llama_worker.Session.generate`). `peak_rss` is that process's peak resident memory.
    """

    backend = "llama.cpp"

    def __init__(self, path: str | Path, max_len: int, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        self.worker = Worker(self.path, threads, max_len)
        self.n_vocab = self.worker.n_vocab
        self.peak_rss = 0

    def timed_generation(self, prompt: torch.Tensor, new_tokens: int, progress: Progress):
        ids = [int(t) % self.n_vocab for t in prompt[0].tolist()]
        for message, _ in self.worker.replies("generate with", op="generate", prompt=ids,
                                              new_tokens=new_tokens):
            if "progress" in message:
                yield progress   # lets a cancel land mid-run; the timing excludes it
        self.peak_rss = max(self.peak_rss, message["peak_rss"])
        return message["prefill"], message["decode"]


def tensor_kernels(path: str | Path) -> list[tuple[str, str, int | None, int]]:
    """(tensor, ggml type, bits or None for float, bytes) of every 2-D weight in a GGUF: what
    llama.cpp reads per token (the token embedding too, though only one row of it is read)."""
    from gguf import GGUFReader

    from studio.core.gguf_parts import parts

    rows = []
    tensors = [t for part in parts(Path(path)) for t in GGUFReader(str(part)).tensors]
    for tensor in tensors:
        if len(tensor.shape) < 2:
            continue
        kind = tensor.tensor_type.name
        digits = "".join(ch for ch in kind.split("_")[0] if ch.isdigit())
        bits = int(digits) if kind.startswith(("Q", "IQ", "TQ")) and digits else None
        rows.append((tensor.name, kind, bits, int(tensor.n_bytes)))
    return rows


def quantize_file(source: str | Path, target: str | Path, ftype: str = "Q4_0",
                  threads: int = 1, token_embedding_type: str | None = None,
                  output_tensor_type: str | None = None) -> Path:
    """llama.cpp's own quantizer (llama-quantize) on a GGUF: `ftype` names a LLAMA_FTYPE
    (MOSTLY_Q4_0 is 2, ...). For benchmarks: the anchor users know. The two ends take a ggml
    type name ("q8_0", "q6_K", "f16"), as llama-quantize's --token-embedding-type and
    --output-tensor-type do."""
    from gguf import GGMLQuantizationType

    ends = {}
    for key, name in (("token_embedding_type", token_embedding_type),
                      ("output_tensor_type", output_tensor_type)):
        if name is not None:
            try:
                ends[key] = int(GGMLQuantizationType[name.upper()])
            except KeyError:
                raise StudioError(f"{name!r} is not a ggml type name.") from None
    ftypes = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15}
    if ftype not in ftypes:
        raise StudioError(f"Unknown llama.cpp type {ftype}; choose from {', '.join(ftypes)}.")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    worker = Worker(None)
    worker.name = Path(source).name
    try:
        worker.call(f"quantize to {ftype}", op="quantize", source=str(source), target=str(tmp),
                    ftype=ftypes[ftype], threads=threads, **ends)
    except StudioError:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        worker.close()
    os.replace(tmp, target)
    return target


def tokenize(path: str | Path, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's token ids for `text` with the GGUF's vocabulary (BOS/EOS as the file says)."""
    worker = Worker(path)
    try:
        return worker.call("tokenize with", op="tokenize", text=text, add_special=add_special)[0]["ids"]
    finally:
        worker.close()


def each_window_job(path: str | Path, windows: torch.Tensor,
                    use: Callable[[int, torch.Tensor], None], threads: int = 1) -> Job[None]:
    """Run each window of token ids [count, seqlen] through llama.cpp (one model load) and
    hand its logits [seqlen, vocab] (float32) to `use(index, logits)`."""
    count, seqlen = windows.shape
    worker = Worker(path, threads, seqlen)
    try:
        for index, window in enumerate(windows.tolist()):
            yield Progress(index, count, f"llama.cpp: window {index + 1} of {count}")
            message, payload = worker.call("run", op="logits", tokens=window)
            use(index, torch.from_numpy(np.frombuffer(payload, dtype=np.float32)
                                        .reshape(message["shape"])))
    finally:
        worker.close()
    yield Progress(count, count, "llama.cpp: done")


def logits_job(path: str | Path, windows: torch.Tensor, threads: int = 1) -> Job[torch.Tensor]:
    """llama.cpp's logits [count, seqlen, vocab] (float32) for each window of token ids."""
    rows: list[torch.Tensor] = []
    yield from each_window_job(path, windows, lambda _, got: rows.append(got), threads)
    return torch.stack(rows)


def logits(path: str | Path, windows: torch.Tensor, threads: int = 1) -> torch.Tensor:
    return run(logits_job(path, windows, threads))


def perplexity_job(path: str | Path, windows: torch.Tensor, threads: int = 1
                   ) -> Job[tuple[float, int]]:
    """(perplexity, predicted tokens) of the GGUF in llama.cpp on `windows`, the studio's
    standard protocol (every token after the first of each window is predicted)."""
    totals = [0.0, 0]

    def add(index: int, got: torch.Tensor) -> None:
        nll = metrics.token_nll(got[None], windows[index:index + 1])
        totals[0] += nll.double().sum().item()
        totals[1] += nll.numel()

    yield from each_window_job(path, windows, add, threads)
    return metrics.perplexity(totals[0], totals[1]), totals[1]
