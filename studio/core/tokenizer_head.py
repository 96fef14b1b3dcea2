"""A tokenizer folder's added tokens, read from the head of its tokenizer.json.

transformers' `AutoTokenizer.from_pretrained` parses the whole tokenizer.json with Python's
`json` (3.4 MB on the demo: 0.35 s with the interpreter's lock held in one C call, 2 s under
load, and ~100 k objects that the window's next young collection walks, 1 s under load) only
to take its `added_tokens` list, when tokenizer_config.json has no `added_tokens_decoder`; then
the Rust tokenizer parses the same file again. The list is the file's fourth key, a few KB
from its start: read there, it gives transformers the same `added_tokens_decoder` its own
legacy branch builds, and that branch is skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

HEAD_BYTES = 1 << 18          # read this much of the file first, then twice as much...
MAX_HEAD_BYTES = 1 << 24      # ...up to this; a longer added-token list takes the slow path
# Keys that may come before "added_tokens" (tokenizers writes version, truncation, padding).
SMALL_KEYS = ("version", "truncation", "padding")


def added_tokens_kwargs(folder: Path) -> dict:
    """{"added_tokens_decoder": {id: AddedToken}} for `from_pretrained`, or {} when the folder
    is not one where this gives exactly what transformers would build (other files that feed
    its legacy branch, a config that already has the tokens, a file laid out otherwise)."""
    config = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config.is_file():
        return {}
    if (folder / "special_tokens_map.json").exists() or (folder / "added_tokens.json").exists():
        return {}                # read by the legacy branch this would skip
    try:
        if "added_tokens_decoder" in json.loads(config.read_text(encoding="utf-8")):
            return {}            # transformers takes them from there already
    except (OSError, ValueError):
        return {}
    tokens = read_added_tokens(folder / "tokenizer.json")
    if tokens is None:
        return {}
    from tokenizers import AddedToken

    decoder = {}
    for entry in tokens:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            return {}
        fields = {k: v for k, v in entry.items() if k != "id"}
        try:
            decoder[entry["id"]] = AddedToken(**fields)
        except TypeError:        # a field this version of tokenizers does not know
            return {}
    return {"added_tokens_decoder": decoder}


def read_added_tokens(path: Path) -> list | None:
    """The top-level "added_tokens" list of a tokenizer.json, from its head; None when it is
    not among the first keys or not within MAX_HEAD_BYTES."""
    size = HEAD_BYTES
    while True:
        with open(path, "rb") as f:
            head = f.read(size)
        complete = len(head) < size
        try:
            return _added_tokens(head.decode("utf-8", errors="strict"))
        except _Truncated:
            if complete or size >= MAX_HEAD_BYTES:
                return None
            size *= 2
        except (UnicodeDecodeError, ValueError):
            if complete or size >= MAX_HEAD_BYTES:   # (a cut inside a UTF-8 character)
                return None
            size *= 2


class _Truncated(Exception):
    pass


def _added_tokens(text: str) -> list | None:
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        return None
    i = _skip(text, i + 1)
    while True:
        if i >= len(text):
            raise _Truncated
        key, i = _value(decoder, text, i)
        i = _skip(text, i)
        if text[i:i + 1] != ":":
            raise _Truncated if i >= len(text) else ValueError("not a JSON object")
        i = _skip(text, i + 1)
        if key == "added_tokens":
            tokens, _ = _value(decoder, text, i)
            return tokens if isinstance(tokens, list) else None
        if key not in SMALL_KEYS:
            return None          # the vocabulary may come first: not worth reading here
        _, i = _value(decoder, text, i)
        i = _skip(text, i)
        if text[i:i + 1] != ",":
            raise _Truncated if i >= len(text) else ValueError("no added_tokens")
        i = _skip(text, i + 1)


def _value(decoder: json.JSONDecoder, text: str, i: int):
    try:
        return decoder.raw_decode(text, i)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text) - 1 or "Unterminated" in exc.msg:
            raise _Truncated from None
        raise


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i
