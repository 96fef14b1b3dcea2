"""The baseline's side of an evaluation, computed once: evaluating a variant then costs one pass
of the variant.

What a variant's figures need from the baseline, per predicted position of every window:
its NLL of the true next token (baseline perplexity, the per-token view), its most likely token
(top-1 agreement) and its distribution (KL). A full distribution is vocab-sized (the demo at
40 x 512: 20k positions x 49k floats = 4 GB), so the summary keeps the baseline's `TOP_K`
largest log-probabilities with their token ids; KL(baseline || variant) is then computed over
those tokens plus one bucket holding the rest of both distributions' mass. That is the KL of
the two distributions coarsened to K + 1 outcomes: never above the full KL, equal to it when
the vocabulary fits in K, and within a few per cent of it when the baseline's tail is small
(measured in tests). Every evaluation with a baseline, cached or not, computes KL this way, so a
cache hit gives exactly the figures of a miss.

Key: the baseline model's fingerprint (its class, config and every tensor's bytes) + the whole
protocol record the evaluation carries (text label, seqlen, windows, tokenization choices...)
+ a hash of the window token ids themselves, so any change to the text, the protocol or the
model computes again. Kept in this process (the last few, for the session) and on disk beside
the model cache (`<cache>/baselines/`), written atomically; an unreadable or mismatched file is
ignored and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from studio.core.files import write_bytes_atomic
from studio.core.streaming import StoredParameter

log = logging.getLogger(__name__)

TOP_K = 256
FORMAT = "baseline-summary v1"
MEMORY_ENTRIES = 3          # summaries kept in this process (a few MB to ~60 MB each)


@dataclass
class BaselineSummary:
    """The baseline on every predicted position: [windows, seqlen - 1] (and x K)."""
    nll: torch.Tensor        # float32, NLL of the true next token
    top_ids: torch.Tensor    # int32, token ids by decreasing probability (top_ids[..., 0]: argmax)
    top_logp: torch.Tensor   # float32, their log-probabilities
    vocab: int

    @classmethod
    def from_logits(cls, logits: torch.Tensor, ids: torch.Tensor, k: int = TOP_K
                    ) -> "BaselineSummary":
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1, sorted=True)
        return cls(nll, top.indices.to(torch.int32), top.values, logp.shape[-1])

    @classmethod
    def cat(cls, parts: list["BaselineSummary"]) -> "BaselineSummary":
        return cls(torch.cat([p.nll for p in parts]), torch.cat([p.top_ids for p in parts]),
                   torch.cat([p.top_logp for p in parts]), parts[0].vocab)

    def rows(self, start: int, stop: int) -> "BaselineSummary":
        return BaselineSummary(self.nll[start:stop], self.top_ids[start:stop],
                               self.top_logp[start:stop], self.vocab)

    @property
    def argmax(self) -> torch.Tensor:
        return self.top_ids[..., 0].long()

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(baseline || model) per predicted position [b, seqlen - 1] for the model's logits
        [b, seqlen, vocab] on the same windows: over the top K plus one bucket for the rest."""
        return self.kl_of(F.log_softmax(logits[:, :-1].float(), dim=-1))

    def kl_of(self, logq: torch.Tensor) -> torch.Tensor:
        """`kl` from the model's log-probabilities [b, seqlen - 1, vocab] (`metrics.log_probs`),
        when the caller has them already."""
        idx = self.top_ids.long()
        logp = self.top_logp
        logq_k = logq.gather(-1, idx)
        kl = (logp.exp() * (logp - logq_k)).sum(-1)
        if idx.shape[-1] < self.vocab:
            # float64 for the 1 - sum: the rest's mass can be ~1e-6 of the whole.
            rest_p = (1 - logp.double().exp().sum(-1)).clamp_min(0)
            rest_q = (1 - logq_k.double().exp().sum(-1)).clamp_min(1e-300)
            tail = torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-300).log()
                                                     - rest_q.log()), torch.zeros_like(rest_p))
            kl = (kl.double() + tail).float()
        return kl.clamp_min(0.0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.nll, self.top_ids, self.top_logp))


# --- keys ----------------------------------------------------------------------------------

_FINGERPRINTS: dict[int, tuple[tuple, str]] = {}


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class, config and every tensor's bytes.

    Hashing ~0.5 GB takes about a second, so the result is remembered per model object and
    reused while every tensor is the same storage at the same version (torch bumps a tensor's
    `_version` on any in-place change, and replacing a tensor changes its storage)."""
    tensors = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        tensors.setdefault(name, t)
    stamp = tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype))
                  for name, t in tensors.items())
    known = _FINGERPRINTS.get(id(model))
    if known is not None and known[0] == stamp:
        return known[1]
    digest = hashlib.sha1()   # the fastest here (~2.5x blake2b); an identity, not a secret
    config = getattr(model, "config", None)
    config_text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") \
        else ""
    digest.update(f"{type(model).__name__}\n{config_text}".encode())
    seen: set[int] = set()
    for name, t in tensors.items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if isinstance(t, StoredParameter):  # streamed: its file and place, not its bytes
            digest.update(f"{t.key}@{t.store.identity()}".encode())
            continue
        if t.data_ptr() in seen:    # a tied weight: its bytes once
            continue
        seen.add(t.data_ptr())
        data = t.detach().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        if data.numel():
            digest.update(data.numpy().reshape(-1).view("uint8").data)   # no copy of the bytes
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[id(model)] = (stamp, fingerprint)
    return fingerprint


def cache_key(fingerprint: str, protocol: dict, ids: torch.Tensor) -> tuple[str, dict]:
    """(hex key, the record it hashes): model + protocol + the window ids themselves."""
    ids_hash = hashlib.blake2b(ids.to(torch.int64).contiguous().numpy().tobytes(),
                               digest_size=20).hexdigest()
    record = {"format": FORMAT, "top_k": TOP_K, "model": fingerprint, "protocol": protocol,
              "ids": ids_hash, "shape": list(ids.shape)}
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest(), record


# --- the cache -----------------------------------------------------------------------------

_MEMORY: "OrderedDict[str, BaselineSummary]" = OrderedDict()


def cache_folder() -> Path:
    from studio.core.models import cache_root
    return cache_root() / "baselines"


def lookup(key: str, record: dict) -> BaselineSummary | None:
    """The summary stored under `key` (this process first, then disk), or None."""
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    summary = _read(cache_folder() / f"{key}.safetensors", record)
    if summary is not None:
        _remember(key, summary)
    return summary


def store(key: str, record: dict, summary: BaselineSummary) -> None:
    from safetensors.torch import save

    _remember(key, summary)
    data = save({"nll": summary.nll.contiguous(), "top_ids": summary.top_ids.contiguous(),
                 "top_logp": summary.top_logp.contiguous()},
                metadata={"record": json.dumps(record, sort_keys=True, default=str),
                          "vocab": str(summary.vocab)})
    try:
        write_bytes_atomic(cache_folder() / f"{key}.safetensors", data)
    except OSError as exc:   # a full or read-only disk costs the next run time, nothing else
        log.warning("could not write the baseline cache: %s", exc)


def clear_memory() -> None:
    _MEMORY.clear()


def _remember(key: str, summary: BaselineSummary) -> None:
    _MEMORY[key] = summary
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)


def _read(path: Path, record: dict) -> BaselineSummary | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            stored = json.loads(meta.get("record", "null"))
            if stored != json.loads(json.dumps(record, sort_keys=True, default=str)):
                raise ValueError("it was written for another model or protocol")
            summary = BaselineSummary(handle.get_tensor("nll"), handle.get_tensor("top_ids"),
                                      handle.get_tensor("top_logp"), int(meta["vocab"]))
        windows, seqlen = record["shape"]
        if (tuple(summary.nll.shape) != (windows, seqlen - 1)
                or summary.top_ids.shape != summary.top_logp.shape
                or summary.top_ids.shape[:2] != summary.nll.shape
                or summary.nll.dtype != torch.float32 or summary.top_ids.dtype != torch.int32):
            raise ValueError("its tensors have the wrong shapes")
        if not bool(torch.isfinite(summary.nll).all()):
            raise ValueError("it holds non-finite values")
        return summary
    except Exception as exc:  # a damaged file is a cache miss, never an error for the user
        log.warning("ignoring the baseline cache file %s: %s", path.name, exc)
        return None
