"""Evaluation: perplexity with the standard protocol, and how far a variant drifts from its baseline.

Standard protocol (../shared/data/README.md): tokenize the whole text once, cut it into
consecutive windows of `seqlen` tokens (stride = seqlen, remainder dropped), and take
PPL = exp(mean cross-entropy over every predicted token of every window). Each window predicts
seqlen - 1 tokens (the first token has no context), so `tokens = windows * (seqlen - 1)`.

Against a baseline the same windows give, per predicted position, the KL divergence
KL(baseline || variant) and whether both pick the same most likely token (top-1 agreement);
the per-token loss increase of the first window feeds the coloured text view.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress
from studio.core.text import eval_windows, load_text, tokenize

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 512
DEFAULT_WINDOWS = 40
DEFAULT_PROMPT = "The three most important ideas in computer science are"
GENERATE_TOKENS = 40


# --- perplexity (called by quantizers and sensitivity too) ---------------------------------

def window_logits(model: nn.Module, windows: torch.Tensor, batch_size: int = 1
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first window index, ids [b, seqlen], float32 logits [b, seqlen, vocab]) per batch."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise StudioError("There are no evaluation windows: the text is too short.")
    batch_size = max(1, int(batch_size))
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start: start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits
            yield start, ids, logits.float()


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> tuple[float, int]:
    """(perplexity, predicted tokens) of `model` on `windows` [count, seqlen], standard protocol."""
    total_nll, tokens = 0.0, 0
    for _, ids, logits in window_logits(model, windows, batch_size):
        nll = metrics.token_nll(logits, ids)
        total_nll += nll.double().sum().item()
        tokens += nll.numel()
    return metrics.perplexity(total_nll, tokens), tokens
