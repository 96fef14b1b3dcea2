"""Run a written GGUF in llama.cpp itself (through the `cyllama` binding, when installed).

transformers' GGUF loader de-quantizes to float32 and computes in float32; llama.cpp keeps the
blocks and quantizes activations (Q8_0/Q8_1) in its CPU dot products, so its logits differ
slightly from the loader's: this is how to measure what llama.cpp users will get (its
perplexity on the studio's windows, its agreement with the variant).

cyllama 0.2.18: `LlamaContext.get_logits_ith` reads `model.n_vocab`, which its LlamaModel lacks,
so the model is opened through a subclass that supplies it. One thread and a passive OpenMP
wait policy: the machine's cores are shared, and a spinning OpenMP pool starves torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress, run


def available() -> bool:
    try:
        _binding()
    except ImportError:
        return False
    return True


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
        use(index, torch.tensor([context.get_logits_ith(i) for i in range(seqlen)]))
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
