"""Calibration and evaluation text -> token windows (seeded, reproducible).

The built-in text is Python's own help topics (`pydoc_data`), which every CPython install
ships: about 465k characters of English technical prose, so the studio calibrates offline on a
fresh machine. A user's own text file replaces it anywhere a text is taken.
"""
from __future__ import annotations

from pathlib import Path

import torch

from studio.core.errors import StudioError

BUILTIN = "built-in (Python help topics)"


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


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive windows, stride = seqlen, remainder dropped: the standard perplexity protocol."""
    _check_length(ids, seqlen)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen)


def calibration_windows(ids: torch.Tensor, seqlen: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` windows of `seqlen` tokens at random offsets drawn with `seed` (as GPTQ samples)."""
    _check_length(ids, seqlen)
    if count < 1:
        raise StudioError(f"The number of windows must be at least 1, not {count}.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=generator)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def text_windows(tokenizer, path: str | Path | None, seqlen: int, count: int,
                 seed: int = 0) -> tuple[torch.Tensor, str]:
    """Calibration windows from a file (or the built-in text) and the source's label."""
    text, label = load_text(path)
    return calibration_windows(tokenize(tokenizer, text), seqlen, count, seed), label


def _check_length(ids: torch.Tensor, seqlen: int) -> None:
    if seqlen < 2:
        raise StudioError(f"The window length must be at least 2 tokens, not {seqlen}.")
    if ids.numel() < seqlen:
        raise StudioError(f"The text has {ids.numel()} tokens, fewer than one window of "
                          f"{seqlen}. Use a longer text or a shorter window.")
