"""Evaluation: perplexity with the standard protocol, and how far a variant drifts from its baseline.

Standard protocol (../shared/data/README.md): tokenize the whole text once, cut it into
consecutive windows of `seqlen` tokens (stride = seqlen, remainder dropped), and take
PPL = exp(mean cross-entropy over every predicted token of every window). Each window predicts
seqlen - 1 tokens (the first token has no context), so `tokens = windows * (seqlen - 1)`.
When the model's tokenizer asks for a BOS token (or `bos="yes"`), each window's first position
becomes BOS, as in llama.cpp's perplexity (text.py); the same tokens are predicted either way.
The protocol of every figure (text, seqlen, windows, BOS) travels in the EvalResult.

Against a baseline the same windows give, per predicted position, the KL divergence
KL(baseline || variant) and whether both pick the same most likely token (top-1 agreement);
the per-token loss increase of the first window feeds the coloured text view.

The baseline's side (its NLL, most likely token and top of its distribution per position) is
computed once per model / protocol / text and cached (`baseline_cache`): evaluating a variant
then costs one pass of the variant. Every result carries its `protocol` record, which is also
what the cache is keyed on.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from studio.core import baseline_cache, metrics
from studio.core.baseline_cache import BaselineSummary
from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress
from studio.core.memory import guard_job
from studio.core.quant.coded import CodedLinear, expanded
from studio.core.text import bos_label, bos_token, eval_windows, load_text, tokenize

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
    with expanded(model), torch.inference_mode():
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


# --- evaluation against a baseline ---------------------------------------------------------

@dataclass
class TokenLosses:
    """The first window, token by token: what the coloured text view shows."""
    tokens: list[str]            # decoded text of every token of the window
    loss: list[float]            # variant's NLL predicting token i (i >= 1; 0.0 for token 0)
    base_loss: list[float] | None  # baseline's, when one was given

    @property
    def increase(self) -> list[float]:
        if self.base_loss is None:
            return [0.0] * len(self.loss)
        return [a - b for a, b in zip(self.loss, self.base_loss)]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "loss": self.loss, "base_loss": self.base_loss}


@dataclass
class EvalResult:
    ppl: float
    tokens: int
    windows: int
    seqlen: int
    text: str                    # label of the text source
    seconds: float
    base_ppl: float | None = None
    kl: float | None = None      # mean KL(baseline || variant) per predicted token, nats
    kl_p99: float | None = None
    top1: float | None = None    # fraction of positions where both pick the same next token
    token_losses: TokenLosses | None = None
    ppl_per_window: list[float] = field(default_factory=list)
    bos: str | None = None       # the token each window starts with (None: none), ...
    bos_setting: str = "auto"    # ... as chosen by this setting (auto: the model's tokenizer)
    protocol: dict = field(default_factory=dict)   # how the windows were made (cache key too)
    baseline_cache: str | None = None  # "hit" / "computed": where the baseline's side came from
    backend: str = "torch"

    def to_dict(self, token_view: bool = False) -> dict:
        data = {"ppl": self.ppl, "tokens": self.tokens, "windows": self.windows,
                "seqlen": self.seqlen, "text": self.text, "bos": self.bos,
                "bos_setting": self.bos_setting, "seconds": round(self.seconds, 2),
                "ppl_per_window": self.ppl_per_window, "protocol": self.protocol,
                "backend": self.backend}
        if self.baseline_cache is not None:
            data["baseline_cache"] = self.baseline_cache
        if self.kl is not None:
            data.update(base_ppl=self.base_ppl, kl=self.kl, kl_p99=self.kl_p99, top1=self.top1)
        if token_view and self.token_losses is not None:
            data["token_losses"] = self.token_losses.to_dict()
        return data


def prepare_windows(tokenizer, text_path: str | Path | None, seqlen: int,
                    windows: int | None, bos: str = "auto") -> tuple[torch.Tensor, str]:
    """Evaluation windows of a text file (None: the built-in text), standard protocol, each
    starting with BOS when `bos` (auto: the model's tokenizer) says so; the label names it."""
    if windows is not None and windows < 1:
        raise StudioError(f"The number of windows must be at least 1, not {windows}.")
    text, label = load_text(text_path)
    token = bos_token(tokenizer, bos)
    if token is not None:
        label = f"{label}, BOS {bos_label(tokenizer, token)} per window"
    return eval_windows(tokenize(tokenizer, text), seqlen, windows, token), label


def protocol_record(label: str, seqlen: int, windows: int, bos: str | None = None) -> dict:
    """What defines the evaluation windows (the standard protocol): carried by every result and
    part of the baseline cache's key, so a new field here invalidates the cache by itself.
    `bos`: the token each window starts with (llama.cpp's protocol), None for none."""
    return {"name": "standard", "text": label, "seqlen": seqlen, "stride": seqlen,
            "windows": windows, "special_tokens": False, "bos": bos}


def evaluate_job(model: nn.Module, baseline_model: nn.Module | None, tokenizer,
                 text_path: str | Path | None = None, seqlen: int = DEFAULT_SEQLEN,
                 windows: int | None = DEFAULT_WINDOWS, batch_size: int = 1,
                 bos: str = "auto") -> Job[EvalResult]:
    """Perplexity of `model` and, with a baseline, KL / top-1 / per-token loss against it."""
    results = yield from evaluate_many_job({"model": model}, baseline_model, tokenizer,
                                           text_path, seqlen, windows, batch_size, bos)
    return results["model"]


def evaluate_many_job(models: dict[str, nn.Module], baseline_model: nn.Module | None, tokenizer,
                      text_path: str | Path | None = None, seqlen: int = DEFAULT_SEQLEN,
                      windows: int | None = DEFAULT_WINDOWS, batch_size: int = 1,
                      bos: str = "auto") -> Job[dict[str, EvalResult]]:
    """`evaluate_job` for several models on the same windows: the baseline runs once per batch
    instead of once per model (the baseline itself may be one of `models`)."""
    yield Progress(0, 1, "Tokenizing the evaluation text")
    ids, label = prepare_windows(tokenizer, text_path, seqlen, windows, bos)
    every = {id(m): m for m in [*models.values(), baseline_model] if m is not None}
    for model in every.values():
        guard_job(model, "eval", windows=batch_size, seqlen=ids.shape[1],
                  variant=any(isinstance(m, CodedLinear) for m in model.modules()),
                  beside=[m for m in every.values() if m is not model])
    bos_text = bos_label(tokenizer, bos_token(tokenizer, bos))
    protocol = protocol_record(label, seqlen, ids.shape[0], bos_text)
    count = ids.shape[0]
    batch_size = max(1, int(batch_size))
    others = {name: m for name, m in models.items() if m is not baseline_model}
    base, how = None, None
    if baseline_model is not None:
        base, how = yield from baseline_job(baseline_model, ids, protocol, batch_size,
                                            extra_steps=count * len(others))
    start = time.perf_counter()    # the models' own time: the baseline's is reported apart
    tallies = {name: _Tally() for name in models}
    done = 0 if how != "computed" else count
    steps = done + count * len(others)
    with contextlib.ExitStack() as stack:
        for model in others.values():
            stack.enter_context(expanded(model))
        for first in range(0, count, batch_size):
            batch = ids[first: first + batch_size]
            rows = None if base is None else base.rows(first, first + batch.shape[0])
            for index, (name, model) in enumerate(others.items()):
                yield Progress(done + first * len(others) + index, steps,
                               f"{name}: window {first + 1} of {count}")
                tallies[name].add(batch, _logits(model, batch), rows)
    for name, model in models.items():
        if model is baseline_model:    # the baseline itself: its figures are the summary's
            tallies[name].add_baseline(ids, base)
    seconds = time.perf_counter() - start
    results = {}
    for name, tally in tallies.items():
        result = tally.result(tokenizer, ids[0], count, seqlen, label, seconds)
        result.protocol, result.baseline_cache = protocol, how
        result.bos, result.bos_setting = bos_text, bos
        results[name] = result
    yield Progress(steps, steps, "Evaluation done")
    return results


def baseline_job(model: nn.Module, ids: torch.Tensor, protocol: dict, batch_size: int = 1,
                 extra_steps: int = 0) -> Job[tuple[BaselineSummary, str]]:
    """(the baseline's summary on `ids`, "hit" or "computed"): from the cache when this model,
    protocol and text were evaluated before, else one pass of the model, then cached.
    `extra_steps`: work the caller does after it, for one progress bar over both."""
    yield Progress(0, 1, "Looking for the baseline's figures")
    key, record = baseline_cache.cache_key(baseline_cache.model_fingerprint(model), protocol, ids)
    found = baseline_cache.lookup(key, record)
    if found is not None:
        log.info("baseline figures from the cache (%s)", key[:12])
        return found, "hit"
    count = ids.shape[0]
    parts = []
    with expanded(model):
        for first in range(0, count, max(1, batch_size)):
            batch = ids[first: first + batch_size]
            yield Progress(first, count + extra_steps, f"Baseline on window {first + 1} of {count}")
            parts.append(BaselineSummary.from_logits(_logits(model, batch), batch))
    summary = BaselineSummary.cat(parts)
    baseline_cache.store(key, record, summary)
    return summary, "computed"


def evaluate_gguf_job(path: str | Path, baseline_model: nn.Module | None, tokenizer,
                      text_path: str | Path | None = None, seqlen: int = DEFAULT_SEQLEN,
                      windows: int | None = DEFAULT_WINDOWS, threads: int = 1,
                      bos: str = "auto") -> Job[EvalResult]:
    """The same evaluation of a GGUF file run by llama.cpp (the optional backend): the same
    windows and protocol, KL / top-1 against the (cached) torch baseline."""
    from studio.core.backends import get_backend
    from studio.core.export import llama_cpp

    reason = get_backend("llama.cpp").unavailable_reason()
    if reason:
        raise StudioError(reason[0].upper() + reason[1:] + ".")
    if tokenizer is None:
        raise StudioError("Evaluating needs the model's tokenizer, and this model has none.")
    yield Progress(0, 1, "Tokenizing the evaluation text")
    ids, label = prepare_windows(tokenizer, text_path, seqlen, windows, bos)
    bos_text = bos_label(tokenizer, bos_token(tokenizer, bos))
    protocol = protocol_record(label, seqlen, ids.shape[0], bos_text)
    base, how = None, None
    if baseline_model is not None:
        base, how = yield from baseline_job(baseline_model, ids, protocol)
    start = time.perf_counter()
    tally = _Tally()

    def use(index: int, logits: torch.Tensor) -> None:
        rows = None if base is None else base.rows(index, index + 1)
        tally.add(ids[index: index + 1], logits[None], rows)

    yield from llama_cpp.each_window_job(path, ids, use, threads)
    result = tally.result(tokenizer, ids[0], ids.shape[0], seqlen, label,
                          time.perf_counter() - start)
    result.protocol, result.baseline_cache, result.backend = protocol, how, "llama.cpp"
    result.bos, result.bos_setting = bos_text, bos
    return result


def evaluate_with_ggufs_job(models: dict[str, nn.Module], ggufs: list, baseline_model, tokenizer,
                            text_path=None, seqlen: int = DEFAULT_SEQLEN,
                            windows: int | None = DEFAULT_WINDOWS, bos: str = "auto",
                            threads: int = 1) -> Job[dict[str, EvalResult]]:
    """`evaluate_many_job` for the torch `models`, then each GGUF file run by llama.cpp on the
    same windows (named `backends.gguf_label`), against the same (cached) baseline."""
    from studio.core.backends import gguf_label

    results = {}
    if models:
        results.update((yield from evaluate_many_job(models, baseline_model, tokenizer,
                                                     text_path, seqlen, windows, bos=bos)))
    for path in ggufs:
        results[gguf_label(path)] = yield from evaluate_gguf_job(
            path, baseline_model, tokenizer, text_path, seqlen, windows, threads, bos)
    return results


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


class _Tally:
    """Running sums of one model's figures over the windows (and against the baseline)."""

    def __init__(self) -> None:
        self.nll_sum = self.base_nll_sum = self.agree = 0.0
        self.tokens = 0
        self.kls: list[torch.Tensor] = []
        self.per_window: list[float] = []
        self.first: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def add(self, ids: torch.Tensor, logits: torch.Tensor, base: BaselineSummary | None):
        logp = metrics.log_probs(logits)    # one softmax over the vocabulary for NLL and KL
        nll = metrics.nll_of(logp, ids)
        kl = agree = None
        if base is not None:
            # Position t's logits predict token t + 1; the last position predicts nothing here.
            kl = base.kl_of(logp).flatten()
            agree = (logits[:, :-1].argmax(-1) == base.argmax).float().sum().item()
        self._add(nll, base, kl, agree)

    def add_baseline(self, ids: torch.Tensor, base: BaselineSummary) -> None:
        """The baseline's own figures, from its summary (KL 0, full agreement)."""
        self._add(base.nll, base, torch.zeros(base.nll.numel()), float(base.nll.numel()))

    def _add(self, nll: torch.Tensor, base: BaselineSummary | None, kl, agree) -> None:
        self.nll_sum += nll.double().sum().item()
        self.tokens += nll.numel()
        self.per_window.extend(metrics.perplexity(row.double().sum().item(), row.numel())
                               for row in nll)
        if base is not None:
            self.base_nll_sum += base.nll.double().sum().item()
            self.kls.append(kl)
            self.agree += agree
        if self.first is None:
            self.first = (nll[0], None if base is None else base.nll[0])

    def result(self, tokenizer, first_ids: torch.Tensor, windows: int, seqlen: int, label: str,
               seconds: float) -> EvalResult:
        result = EvalResult(ppl=metrics.perplexity(self.nll_sum, self.tokens), tokens=self.tokens,
                            windows=windows, seqlen=seqlen, text=label, seconds=seconds,
                            ppl_per_window=self.per_window)
        if self.kls:
            kl = torch.cat(self.kls).double()
            result.base_ppl = metrics.perplexity(self.base_nll_sum, self.tokens)
            result.kl = kl.mean().item()
            result.kl_p99 = torch.quantile(kl, 0.99).item() if kl.numel() > 1 else kl.item()
            result.top1 = self.agree / self.tokens
        result.token_losses = token_losses(tokenizer, first_ids, *self.first)
        return result


def token_losses(tokenizer, ids: torch.Tensor, nll: torch.Tensor,
                 base_nll: torch.Tensor | None) -> TokenLosses:
    pieces = [tokenizer.decode([int(i)]) for i in ids]
    loss = [0.0] + nll.tolist()
    base = None if base_nll is None else [0.0] + base_nll.tolist()
    return TokenLosses(pieces, loss, base)


# --- generations side by side --------------------------------------------------------------

def greedy_generate(model: nn.Module, tokenizer, prompt: str,
                    max_new_tokens: int = GENERATE_TOKENS) -> Iterator[str]:
    """Yield the text generated so far after each greedy token (KV cache, stops at EOS)."""
    if not prompt.strip():
        raise StudioError("The prompt is empty: type a few words to continue.")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    eos = tokenizer.eos_token_id
    new: list[int] = []
    with expanded(model), torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            yield tokenizer.decode(new, skip_special_tokens=True)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                        use_cache=True)


def generations_job(models: dict[str, nn.Module], tokenizer, prompt: str = DEFAULT_PROMPT,
                    max_new_tokens: int = GENERATE_TOKENS) -> Job[dict[str, str]]:
    """name -> greedy continuation of `prompt`, for each model in turn."""
    if tokenizer is None:
        raise StudioError("This model has no tokenizer, so it cannot generate text.")
    texts: dict[str, str] = {}
    total = len(models) * max_new_tokens
    for index, (name, model) in enumerate(models.items()):
        text = ""
        for step, text in enumerate(greedy_generate(model, tokenizer, prompt, max_new_tokens)):
            yield Progress(index * max_new_tokens + step, total, f"Generating with {name}")
        texts[name] = text
    yield Progress(total, total, "Generations done")
    return texts
