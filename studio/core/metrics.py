"""Numbers that compare a model's outputs with the baseline's: shared by evaluation,
sensitivity and benchmarks so every view reports the same quantity the same way."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ids[:, 1:] given logits[:, :-1] -> [batch, seq-1]."""
    return nll_of(log_probs(logits), ids)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of the positions that predict a next token (logits[:, :-1]), in float32."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def nll_of(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`token_nll` from `log_probs`: one softmax over the vocabulary serves NLL and KL."""
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens)


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || variant) per position, in nats -> [...] (llama.cpp's KLD direction)."""
    base = F.log_softmax(base_logits.float(), dim=-1)
    other = F.log_softmax(logits.float(), dim=-1)
    return (base.exp() * (base - other)).sum(-1).clamp_min(0.0)


def top1_agreement(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """1.0 where the variant's most likely next token equals the baseline's, else 0.0."""
    return (base_logits.argmax(-1) == logits.argmax(-1)).float()


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference||^2 / ||reference||^2 (0 = identical)."""
    ref = reference.float()
    denom = ref.pow(2).sum().item()
    return (approx.float() - ref).pow(2).sum().item() / max(denom, 1e-30)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    err = relative_error(reference, approx)
    return float("inf") if err == 0 else -10.0 * math.log10(err)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor,
                 ref_energy: float | None = None) -> float:
    """||X (Wq - W)^T||^2 / ||X W^T||^2: the layer's relative output error on inputs X."""
    if ref_energy is None:
        ref_energy = (x @ w.T).pow(2).sum().item()
    return (x @ (wq - w).T).pow(2).sum().item() / max(ref_energy, 1e-30)
