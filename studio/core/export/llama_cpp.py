"""Run a written GGUF in llama.cpp itself (through the `cyllama` binding, when installed).

transformers' GGUF loader de-quantizes to float32 and computes in float32; llama.cpp keeps the
blocks and quantizes activations (Q8_0/Q8_1) in its CPU dot products, so its logits differ
slightly from the loader's: this is how to measure what llama.cpp users will get (its
perplexity on the studio's windows, its agreement with the variant).

cyllama 0.2.18: `LlamaContext.get_logits_ith` reads `model.n_vocab`, which its LlamaModel lacks,
so the model is opened through a subclass that supplies it. One thread and a passive OpenMP
wait policy: the machine's cores are shared, and a spinning OpenMP pool starves torch.

The benchmark's llama.cpp backend (`Generator`) times prefill and greedy decode here with the
same prompt ids and lengths as the torch path; `build_info` says which build produced a figure.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

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


def _open(path: Path, threads: int, n_ctx: int):
    cy = _binding()
    cy.disable_logging()
    cy.ggml_backend_load_all()

    class Model(cy.LlamaModel):
        @property
        def n_vocab(self) -> int:       # what get_logits_ith reads (missing in 0.2.18)
            return self.get_vocab().n_vocab

    model_params = cy.LlamaModelParams()
    model_params.n_gpu_layers = 0
    try:
        model = Model(str(path), model_params)
    except Exception as exc:  # the binding raises plain exceptions for unreadable files
        raise StudioError(f"llama.cpp could not load {Path(path).name}: {exc}") from None
    context_params = cy.LlamaContextParams()
    context_params.n_ctx = n_ctx
    context_params.n_batch = context_params.n_ubatch = n_ctx
    context_params.n_threads = context_params.n_threads_batch = threads
    context_params.no_perf = True
    return cy, model, cy.LlamaContext(model, context_params)


class Generator:
    """A GGUF opened in llama.cpp for timed greedy generation (the benchmark's llama.cpp backend).

    `timed_generation(prompt, new_tokens, progress)` has the torch path's contract: a job that
    returns (prefill seconds, decode seconds). Prefill asks for the last position's logits only,
    as the torch path does; each decode step decodes one token and picks the next greedily with
    llama.cpp's own sampler (no per-step copy of the logits into Python).
    """

    backend = "llama.cpp"

    def __init__(self, path: str | Path, max_len: int, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        self.cy, self.model, self.context = _open(self.path, threads, max_len)
        self.n_vocab = self.model.n_vocab
        self.sampler = self.cy.LlamaSampler(self.cy.LlamaSamplerChainParams())
        self.sampler.add_greedy()

    def timed_generation(self, prompt: torch.Tensor, new_tokens: int, progress: Progress):
        cy, context = self.cy, self.context
        ids = [int(t) % self.n_vocab for t in prompt[0].tolist()]
        context.kv_cache_clear()
        batch = cy.LlamaBatch(n_tokens=len(ids), embd=0, n_seq_max=1)
        for position, token in enumerate(ids):
            batch.add(token, position, [0], position == len(ids) - 1)
        start = time.perf_counter()
        context.decode(batch)
        token = self.sampler.sample(context, -1)
        prefill = time.perf_counter() - start
        step_batch = cy.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        decode, position = 0.0, len(ids)
        for step in range(new_tokens):
            start = time.perf_counter()
            step_batch.clear()
            step_batch.add(token, position, [0], True)
            context.decode(step_batch)
            token = self.sampler.sample(context, -1)
            position += 1
            decode += time.perf_counter() - start
            if step % 16 == 15:
                yield progress   # lets a cancel land mid-run; the timing excludes it
        return prefill, decode


def tensor_kernels(path: str | Path) -> list[tuple[str, str, int | None, int]]:
    """(tensor, ggml type, bits or None for float, bytes) of every 2-D weight in a GGUF: what
    llama.cpp reads per token (the token embedding too, though only one row of it is read)."""
    from gguf import GGUFReader

    rows = []
    for tensor in GGUFReader(str(path)).tensors:
        if len(tensor.shape) < 2:
            continue
        kind = tensor.tensor_type.name
        digits = "".join(ch for ch in kind.split("_")[0] if ch.isdigit())
        bits = int(digits) if kind.startswith(("Q", "IQ", "TQ")) and digits else None
        rows.append((tensor.name, kind, bits, int(tensor.n_bytes)))
    return rows


def quantize_file(source: str | Path, target: str | Path, ftype: str = "Q4_0",
                  threads: int = 1) -> Path:
    """llama.cpp's own quantizer (llama-quantize) on a GGUF: `ftype` names a LLAMA_FTYPE
    (MOSTLY_Q4_0 is 2, ...). For benchmarks: the anchor users know."""
    cy = _binding()
    cy.disable_logging()
    ftypes = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15}
    if ftype not in ftypes:
        raise StudioError(f"Unknown llama.cpp type {ftype}; choose from {', '.join(ftypes)}.")
    params = cy.LlamaModelQuantizeParams()
    params.ftype = ftypes[ftype]
    params.nthread = threads
    params.allow_requantize = True       # the demo ships already quantized (Q4_1)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        cy.model_quantize(str(source), str(tmp), params)
    except RuntimeError as exc:
        tmp.unlink(missing_ok=True)
        raise StudioError(f"llama.cpp could not quantize {Path(source).name} to {ftype}: "
                          f"{exc}") from None
    os.replace(tmp, target)
    return target


def tokenize(path: str | Path, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's token ids for `text` with the GGUF's vocabulary (BOS/EOS as the file says)."""
    _, model, _ = _open(Path(path), 1, 64)
    return list(model.get_vocab().tokenize(text, add_special, False))


def each_window_job(path: str | Path, windows: torch.Tensor,
                    use: Callable[[int, torch.Tensor], None], threads: int = 1) -> Job[None]:
    """Run each window of token ids [count, seqlen] through llama.cpp (one model load) and
    hand its logits [seqlen, vocab] (float32) to `use(index, logits)`."""
    count, seqlen = windows.shape
    cy, model, context = _open(Path(path), threads, seqlen)
    for index, window in enumerate(windows.tolist()):
        yield Progress(index, count, f"llama.cpp: window {index + 1} of {count}")
        context.kv_cache_clear()          # every window starts from an empty context
        batch = cy.LlamaBatch(n_tokens=seqlen, embd=0, n_seq_max=1)
        for position, token in enumerate(window):
            batch.add(token, position, [0], True)
        context.decode(batch)
        # Through NumPy: torch.tensor on nested lists is ~8x slower, as slow as the decode.
        rows = [context.get_logits_ith(i) for i in range(seqlen)]
        use(index, torch.from_numpy(np.array(rows, dtype=np.float32)))
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
