"""A model's tokenizer kept on disk as text jobs need it, so that they tokenize in a child
process and the window never waits on the tokenizer's parse.

Why: parsing a tokenizer (`tokenizers`, in Rust) holds the interpreter's lock for its whole
length, 65 ms quiet for the demo's 3.4 MB tokenizer.json and 90-180 ms beside the window, and
no thread can run Python meanwhile: the window stalls. The first time a model's tokenizer is
parsed here, `cached` writes an entry under the studio's cache: the backend's own
serialization (what transformers encodes with), its BOS facts and the decoded text of every
token; the entry is kept only when the child process encodes a sample exactly as the parsed
tokenizer does. From then on the handle gets a `SpawnedTokenizer`: text is encoded by
`python -m studio.core.tokenize_worker`, single tokens are read from the entry, and anything
else (generation, export) parses the real tokenizer here, as before.

An entry is named by the tokenizer's files (names, sizes, modification times), the GGUF the
model came from, and the versions of the studio, transformers and tokenizers: a change to any
of them makes a new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

import studio
from studio.core.errors import StudioError
from studio.core.files import atomic_dir, cache_root, files_identity
from studio.core.versions import library_version

FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
# The check an entry passes before it is kept: prose, digits, spacing and non-ASCII text.
SAMPLE_TAIL = "\n\n  Tabs\tand  spaces,  3.14159 x 10^-3; naïve café, 東京, emoji 🙂.\n"
SAMPLE_CHARS = 4000
KEEP_ENCODED = 4   # texts whose ids stay in memory (a session tokenizes one or two texts)
KEEP_ENTRIES = 32  # entries on disk (~2 MB each for a 50k vocabulary); the oldest used go first

_encoded: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_encoded_lock = threading.Lock()


def cached(folder: Path, gguf: Path | None,
           parse: Callable[[], tuple[object | None, list[str]]]) -> tuple[object | None, list[str]]:
    """(tokenizer, notes) for the model in `folder`: a `SpawnedTokenizer` when an entry exists,
    else `parse()`'s tokenizer, whose entry is then written for the next time."""
    try:
        entry = cache_root() / "tokenizers" / entry_name(folder, gguf)
    except OSError:   # an unreadable folder: the parse says what is wrong, if anything
        return parse()
    meta = read_meta(entry)
    if meta is not None:
        with contextlib.suppress(OSError):
            os.utime(entry)   # used: the last to be pruned
        return SpawnedTokenizer(entry, meta, lambda: parse()[0]), list(meta["notes"])
    tokenizer, notes = parse()
    if tokenizer is not None and store(entry, tokenizer, notes):
        with contextlib.suppress(OSError):
            prune(entry.parent)
    return tokenizer, notes


def entry_name(folder: Path, gguf: Path | None) -> str:
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES)]
    stamp = [FORMAT, studio.__version__, library_version("transformers"),
             library_version("tokenizers"), str(folder.resolve()),
             files_identity(files + ([gguf] if gguf is not None else []))]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]


def read_meta(entry: Path) -> dict | None:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = meta.get("format") == FORMAT and (entry / "backend.json").is_file() and \
        (entry / "pieces.json").is_file()
    return meta if ok else None


def store(entry: Path, tokenizer, notes: list[str]) -> bool:
    """Write `tokenizer`'s entry; False (nothing written) when it is not a fast tokenizer or the
    child process does not encode the sample exactly as it does."""
    from studio.core.text import builtin_text, model_adds_bos

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(sys, "frozen", False):
        return False
    try:
        serialized = backend.to_str()
        pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        sample = builtin_text()[:SAMPLE_CHARS] + SAMPLE_TAIL
        expected = tokenizer(sample, add_special_tokens=False,
                             return_attention_mask=False)["input_ids"]
        meta = {"format": FORMAT, "notes": notes, "size": len(tokenizer),
                "adds_bos": model_adds_bos(tokenizer),
                "bos_token_id": getattr(tokenizer, "bos_token_id", None),
                "bos_token": getattr(tokenizer, "bos_token", None),
                "eos_token_id": getattr(tokenizer, "eos_token_id", None)}
        with atomic_dir(entry) as tmp:
            (tmp / "backend.json").write_text(serialized, encoding="utf-8")
            (tmp / "pieces.json").write_text(json.dumps(pieces), encoding="utf-8")
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            got = run_worker(tmp / "backend.json", sample)
            if got is None or got.tolist() != list(expected):
                raise ValueError("the child process encodes otherwise")   # (drops the folder)
    except Exception:   # any failure costs only the speed-up: the tokenizer parses here
        return False
    return True


def prune(folder: Path) -> None:
    """Remove all but the KEEP_ENTRIES entries used last (an entry folder's time: its last
    use)."""
    entries = sorted((f for f in folder.iterdir() if f.is_dir() and not f.name.startswith(".")),
                     key=lambda f: f.stat().st_mtime_ns, reverse=True)
    for old in entries[KEEP_ENTRIES:]:
        shutil.rmtree(old, ignore_errors=True)


def encode(entry: Path, text: str) -> np.ndarray | None:
    """`text`'s ids from the entry's tokenizer, encoded in a child process (None: it failed)."""
    key = (entry.name, hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest())
    with _encoded_lock:
        if key in _encoded:
            _encoded.move_to_end(key)
            return _encoded[key]
    ids = run_worker(entry / "backend.json", text)
    if ids is not None:
        with _encoded_lock:
            _encoded[key] = ids
            while len(_encoded) > KEEP_ENCODED:
                _encoded.popitem(last=False)
    return ids


def run_worker(backend: Path, text: str) -> np.ndarray | None:
    if getattr(sys, "frozen", False):   # a frozen app has no interpreter to start
        return None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(studio.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-m", "studio.core.tokenize_worker", str(backend)],
                              input=text.encode("utf-8"), capture_output=True, env=env)
    except OSError:
        return None
    if done.returncode != 0 or len(done.stdout) % 4:
        return None
    ids = np.frombuffer(done.stdout, dtype="<i4")
    ids.flags.writeable = False   # shared by every job that tokenizes the same text
    return ids


class SpawnedTokenizer:
    """A model's tokenizer for what text jobs ask of it, answered without parsing it in this
    process: text encoded without special tokens (in a child process), one token decoded,
    its BOS facts. Anything else is asked of the real tokenizer, parsed here on first use;
    once anything is set on it, every question goes to the real one (the entry may no longer
    describe it)."""

    _OWN = frozenset({"entry", "_meta", "_load", "_real", "_pieces", "_lock", "_detached"})

    def __init__(self, entry: Path, meta: dict, load: Callable[[], object]):
        self.entry = entry
        self._meta = meta
        self._load = load
        self._real = None
        self._pieces: list[str] | None = None
        self._lock = threading.Lock()
        self._detached = False

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        plain = kwargs.keys() <= {"return_attention_mask"} and \
            not kwargs.get("return_attention_mask")
        if isinstance(text, str) and not add_special_tokens and plain and not self._detached:
            ids = encode(self.entry, text)
            if ids is not None:
                return {"input_ids": ids}
        return self.real()(text, add_special_tokens=add_special_tokens, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        if not (kwargs or self._detached) and len(ids) == 1 and 0 <= int(ids[0]) < len(self):
            return self.pieces()[int(ids[0])]
        return self.real().decode(ids, **kwargs)

    def pieces(self) -> list[str]:
        with self._lock:
            if self._pieces is None:
                self._pieces = json.loads((self.entry / "pieces.json").read_text(encoding="utf-8"))
            return self._pieces

    @property
    def adds_bos(self) -> bool:
        from studio.core.text import model_adds_bos

        return model_adds_bos(self.real()) if self._detached else self._meta["adds_bos"]

    @property
    def bos_token_id(self) -> int | None:
        return self._fact("bos_token_id")

    @property
    def bos_token(self) -> str | None:
        return self._fact("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._fact("eos_token_id")

    def _fact(self, name: str):
        return getattr(self.real(), name, None) if self._detached else self._meta[name]

    def real(self):
        """The tokenizer itself, parsed here the first time it is asked for."""
        with self._lock:
            if self._real is None:
                self._real = self._load()
            if self._real is None:
                raise StudioError("This model's tokenizer could not be loaded again; reopen "
                                  "the model.")
            return self._real

    def __len__(self) -> int:
        return len(self.real()) if self._detached else self._meta["size"]

    def __getattr__(self, name: str):
        if name.startswith("__") or name in self._OWN:
            raise AttributeError(name)
        return getattr(self.real(), name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
            return
        real = self.real()
        self._detached = True
        setattr(real, name, value)
