"""Calibration and evaluation text -> token windows (seeded, reproducible).

The built-in text is Python's own help topics (`pydoc_data`), which every CPython install
ships: about 465k characters of English technical prose, so the studio calibrates offline on a
fresh machine. A user's own text file replaces it anywhere a text is taken.

BOS: a model whose tokenizer puts a BOS token in front of every text (Llama-2, Gemma, OPT...)
was trained on sequences that start with it, and measured without it its perplexity can come out
several times too high. Windows therefore follow llama.cpp's perplexity tool: when the model asks
for BOS, each window's first position *becomes* BOS (the token it held is dropped, the window
keeps its length and predicts the same seqlen - 1 tokens, so figures with and without BOS count
the same tokens). "Asks for BOS" is what the tokenizer does when it encodes a text with its
special tokens (its post-processor / add_bos_token); for a GGUF source the file's
`tokenizer.ggml.add_bos_token` decides (models.py makes the tokenizer agree with it). The
setting `auto` follows the model, `yes` / `no` override it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from studio.core.errors import StudioError

BUILTIN = "built-in (Python help topics)"
BOS_SETTINGS = ("auto", "yes", "no")   # the --bos choices and the evaluate view's menu


def builtin_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out; fall back to docstrings
        import json as mod_json, os as mod_os, pathlib as mod_pathlib  # noqa: E401
        return "\n\n".join(m.__doc__ or "" for m in (mod_os, mod_json, mod_pathlib))
    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def load_text(path: str | Path | None) -> tuple[str, str]:
    """(text, label) for a user's text file, or the built-in text when `path` is None."""
    if path is None:
        return builtin_text(), BUILTIN
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"Text file {path} does not exist.")
    data = path.read_bytes()
    if not data.strip():
        raise StudioError(f"Text file {path.name} is empty.")
    if b"\x00" in data[:65536]:
        raise StudioError(f"{path.name} looks like a binary file, not text.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StudioError(f"{path.name} is not UTF-8 text (byte {exc.start} is invalid). "
                          f"Save it as UTF-8 and try again.") from None
    return text, path.name


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added in the middle)."""
    if tokenizer is None:
        raise StudioError("This model has no tokenizer, so text cannot be fed to it.")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def model_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text it encodes with special
    tokens: what the model was trained to see first."""
    known = getattr(tokenizer, "adds_bos", None)   # a `tokenizer_cache.SpawnedTokenizer`'s
    if known is not None:
        return known
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    except Exception:  # a tokenizer that cannot encode with specials adds nothing we can see
        return False
    return len(ids) > 0 and ids[0] == bos


def bos_token(tokenizer, setting: str = "auto") -> int | None:
    """The BOS id each window starts with under `setting` (auto | yes | no), or None."""
    if setting not in BOS_SETTINGS:
        raise StudioError(f"The BOS setting must be one of {', '.join(BOS_SETTINGS)}, "
                          f"not {setting!r}.")
    if setting == "no" or tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if setting == "yes":
        if bos is None:
            raise StudioError("This model's tokenizer has no BOS token, so windows cannot start "
                              "with one: use --bos auto or no.")
        return int(bos)
    return int(bos) if model_adds_bos(tokenizer) else None


def bos_label(tokenizer, bos: int | None) -> str | None:
    """The BOS token's text (e.g. "<s>") for protocol records; None when windows have none."""
    if bos is None:
        return None
    return getattr(tokenizer, "bos_token", None) or f"id {bos}"


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """llama.cpp's per-chunk BOS: each window's first position becomes `bos` (a new tensor)."""
    if bos is None:
        return windows
    windows = windows.clone()
    windows[:, 0] = bos
    return windows


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                 bos: int | None = None) -> torch.Tensor:
    """Consecutive windows, stride = seqlen, remainder dropped: the standard perplexity protocol
    (with `bos`: every window's first token replaced by it, as llama.cpp's perplexity does)."""
    _check_length(ids, seqlen)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return with_bos(ids[: count * seqlen].reshape(count, seqlen), bos)


def calibration_windows(ids: torch.Tensor, seqlen: int, count: int, seed: int = 0,
                        bos: int | None = None) -> torch.Tensor:
    """`count` windows of `seqlen` tokens at random offsets drawn with `seed` (as GPTQ samples);
    with `bos`, each starting with it (the offsets do not depend on it)."""
    _check_length(ids, seqlen)
    if count < 1:
        raise StudioError(f"The number of windows must be at least 1, not {count}.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=generator)
    return with_bos(torch.stack([ids[s: s + seqlen] for s in starts.tolist()]), bos)


def text_windows(tokenizer, path: str | Path | None, seqlen: int, count: int,
                 seed: int = 0, bos: str = "auto") -> tuple[torch.Tensor, str]:
    """Calibration windows from a file (or the built-in text) and the source's label; the label
    names the BOS token when the windows start with one (the variant records it)."""
    text, label = load_text(path)
    token = bos_token(tokenizer, bos)
    windows = calibration_windows(tokenize(tokenizer, text), seqlen, count, seed, token)
    if token is not None:
        label = f"{label}, BOS {bos_label(tokenizer, token)} per window"
    return windows, label


def _check_length(ids: torch.Tensor, seqlen: int) -> None:
    if seqlen < 2:
        raise StudioError(f"The window length must be at least 2 tokens, not {seqlen}.")
    if ids.numel() < seqlen:
        raise StudioError(f"The text has {ids.numel()} tokens, fewer than one window of "
                          f"{seqlen}. Use a longer text or a shorter window.")
