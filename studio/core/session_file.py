"""A session on disk: the model it is about, its plan, variants, computed results and the
window's state, in one versioned folder, saved and restored without pickle.

    NAME.session/
      session.json        format, version, the model (source, architecture, fingerprint), the
                          plan (a recipe), results and runs (JSON; arrays by reference), the
                          variants (by folder, below), the window's state
      arrays.safetensors  every NumPy array / tensor of the results
      variants/<name>/    each variant as a VARIANT folder (`variant.save_variant`)

Results are encoded generically: JSON values, tuples, dicts, arrays, and dataclasses of the
studio's own result types (`RESULT_TYPES`, an allowlist: a session file from anywhere can only
build those, through their constructors and checks). A result of any other type is left out and
named in `SavedSession.skipped`. The folder is written with `files.atomic_dir`: a kill leaves
the previous session or the new one.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.errors import ModelLoadError, StudioError
from studio.core.files import atomic_dir, read_json, safe_name
from studio.core.jobs import Job, Progress, run
from studio.core.typecheck import wrong_fields

SESSION_FORMAT = "compression-studio-session"
SESSION_VERSION = 1
SUFFIX = ".session"


class ModelMoved(ModelLoadError):
    """The session's model is no longer where it was saved: the user may locate it."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(message)
        self.source = source


def result_types() -> dict[str, type]:
    """The only classes a session file may build ("module:Qualname" -> class)."""
    from studio.core.activations import ActivationCapture, InputStats
    from studio.core.plan import Plan, QuantSpec, Rule
    from studio.core.sensitivity import ModelIdentity, SensitivityResult
    from studio.core.stats import LayerWeightStats, WeightStats

    classes = (ActivationCapture, InputStats, Plan, QuantSpec, Rule, ModelIdentity,
               SensitivityResult, LayerWeightStats, WeightStats)
    return {f"{c.__module__}:{c.__qualname__}": c for c in classes}


# --- encoding --------------------------------------------------------------------------------

class _Unsupported(Exception):
    pass


def encode(value: Any, arrays: "dict | _Arrays", types: dict[type, str]) -> Any:
    """`value` as JSON, arrays moved into `arrays` (name -> tensor)."""
    import numpy as np   # (here, not at the top: the window's shell imports this module)
    import torch

    # Imported once, not at every node: in the window, PySide6 hooks `import` in Python
    # (shibokensupport's feature_import), and an autosave walks thousands of nodes.
    arrays = arrays if isinstance(arrays, _Arrays) else _Arrays(arrays)
    return _encode(value, arrays, types, np, torch)


def _encode(value: Any, arrays: "_Arrays", types: dict[type, str], np, torch) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) \
            else value.detach().cpu().contiguous()
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise _Unsupported("an object array")
        return {"__array__": arrays.add(tensor.clone()), "numpy": isinstance(value, np.ndarray)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, arrays, types, np, torch) for v in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, arrays, types, np, torch),
                              _encode(v, arrays, types, np, torch)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and type(value) in types:
        fields = {f.name: _encode(getattr(value, f.name), arrays, types, np, torch)
                  for f in dataclasses.fields(value) if f.init}
        return {"__type__": types[type(value)], "fields": fields}
    raise _Unsupported(type(value).__name__)


def decode(value: Any, arrays: dict, classes: dict[str, type], depth: int = 0) -> Any:
    if depth > 64:
        raise StudioError("the results nest too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(v, arrays, classes, depth + 1) for v in value]
    if not isinstance(value, dict):
        raise StudioError(f"unexpected {type(value).__name__} in the results")
    if "__array__" in value:
        tensor = arrays.get(value["__array__"])
        if tensor is None:
            raise StudioError(f"array {value['__array__']!r} is missing")
        return tensor.numpy() if value.get("numpy") else tensor
    if "__tuple__" in value:
        return tuple(decode(v, arrays, classes, depth + 1) for v in value["__tuple__"])
    if "__dict__" in value:
        out = {}
        for pair in value["__dict__"]:
            key, item = pair  # ValueError/TypeError when not a pair: caught by the loader
            key = decode(key, arrays, classes, depth + 1)
            if isinstance(key, (list, dict)):
                raise StudioError("a result's key is not a name or number")
            out[key] = decode(item, arrays, classes, depth + 1)
        return out
    if "__type__" in value:
        cls = classes.get(value["__type__"])
        if cls is None:
            raise StudioError(f"{value['__type__']!r} is not a result type the studio saves")
        fields = value.get("fields")
        if not isinstance(fields, dict):
            raise StudioError(f"{value['__type__']} has no fields")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        if set(fields) - known:
            raise StudioError(f"{cls.__name__} has no field {sorted(set(fields) - known)[0]}")
        kwargs = {k: decode(v, arrays, classes, depth + 1) for k, v in fields.items()}
        wrong = wrong_fields(cls, kwargs)
        if wrong:
            raise StudioError(f"{cls.__name__}.{wrong[0]} is not of its declared type")
        return cls(**kwargs)
    raise StudioError("an object of unknown kind in the results")



# --- saving ----------------------------------------------------------------------------------

@dataclass
class SavedSession:
    path: Path
    skipped: list[str] = field(default_factory=list)   # results of types a session cannot hold


def model_fingerprint(handle) -> str:
    """The open model's fingerprint, computed once per handle: every autosave asked for it,
    reading a sample of every layer again (a streamed model reads them from disk)."""
    from studio.core.sensitivity import ModelIdentity

    cached = getattr(handle, "_session_fingerprint", None)
    if cached is None:
        cached = ModelIdentity.of(handle).fingerprint
        try:
            handle._session_fingerprint = cached
        except AttributeError:   # a handle that takes no new attribute: computed each time
            pass
    return cached


class EncodeCache:
    """Each published result encoded once: results are never changed once published, so an
    autosave after every job re-encodes only what is new. Keyed by the session key and held by
    the value itself (an id alone could be reused by another object); used from one thread."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, Any, dict, str | None]] = {}
        self.encoded = 0                 # how many results were encoded (not taken from here)

    def result(self, key: str, value: Any, types: dict[type, str]) -> tuple[Any, dict]:
        """(JSON, arrays) of one result; raises _Unsupported for a type a session cannot hold."""
        entry = self._entries.get(key)
        if entry is None or entry[0] is not value:
            arrays: dict = {}
            try:
                doc, error = encode(value, _Arrays(arrays, f"{len(key)}:{key}/"), types), None
            except _Unsupported as exc:
                doc, error = None, str(exc)
            entry = self._entries[key] = (value, doc, arrays, error)
            self.encoded += 1
        _, doc, arrays, error = entry
        if error is not None:
            raise _Unsupported(error)
        return doc, arrays

    def keep_only(self, keys) -> None:
        """Forget results no longer in the session (a model closed, a result replaced)."""
        for key in set(self._entries) - set(keys):
            del self._entries[key]


class _Arrays:
    """Where `encode` puts arrays: names carry a prefix (a result's key), so that results
    encoded apart never name two arrays alike."""

    def __init__(self, target: dict, prefix: str = "") -> None:
        self.target, self.prefix = target, prefix

    def add(self, tensor) -> str:
        name = f"{self.prefix}a{len(self.target)}"
        self.target[name] = tensor
        return name


def save_session(session, path: str | Path, window: dict | None = None) -> SavedSession:
    """Write `session` (a `session.Session` with a model) and `window` (JSON values) to `path`."""
    return run(save_session_job(session, path, window))


def save_session_job(session, path: str | Path, window: dict | None = None,
                     cache: EncodeCache | None = None) -> Job[SavedSession]:
    """`save_session` in steps: one per result, the arrays, one per variant. The autosave writer
    pauses between steps while a job runs, so it does not take the interpreter from the job and
    the window (every busy Python thread lengthens the window's waits for the GIL)."""
    from studio.core.export.safetensors_stream import save as save_file
    from studio.core.variant import save_variant

    path = Path(path)
    handle = session.handle
    if handle is None:
        raise StudioError("Open a model first: a session is about one model.")
    cache = cache or EncodeCache()
    types = {cls: name for name, cls in result_types().items()}
    steps = len(session.results) + 3 + len(session.variants)
    arrays: dict = {}
    results, skipped = {}, []
    for i, (key, value) in enumerate(session.results.items()):
        yield Progress(i, steps, f"Encoding {key}")
        try:
            results[key], own = cache.result(key, value, types)
            arrays.update(own)
        except _Unsupported as exc:
            skipped.append(f"{key} ({exc})")
    cache.keep_only(session.results)
    yield Progress(len(session.results), steps, "Encoding the runs")
    rest = _Arrays(arrays, "session/")
    try:
        runs = encode(session.runs, rest, types)
    except _Unsupported as exc:
        runs, skipped = [], skipped + [f"runs ({exc})"]
    variants = {name: f"variants/{safe_name(name)}" for name in session.variants}
    doc = {
        "format": SESSION_FORMAT, "version": SESSION_VERSION, "saved": time.time(),
        "model": {"source": handle.source, "architecture": handle.architecture,
                  "fingerprint": model_fingerprint(handle)},
        "plan": session.plan.to_json(), "results": results, "runs": runs,
        "variants": variants, "window": encode(window or {}, rest, types),
    }
    import json
    with atomic_dir(path) as tmp:
        yield Progress(len(session.results) + 1, steps, "Writing the results")
        (tmp / "session.json").write_text(json.dumps(doc, indent=1, allow_nan=True))
        save_file(arrays, str(tmp / "arrays.safetensors"))
        for i, (name, folder) in enumerate(variants.items()):
            yield Progress(len(session.results) + 2 + i, steps, f"Writing variant {name}")
            if not _link_unchanged(session.variants[name], path / folder, tmp / folder):
                save_variant(session.variants[name], tmp / folder)
    yield Progress(steps, steps, f"Saved {path.name}")
    return SavedSession(path, skipped)


def _link_unchanged(variant, old: Path, new: Path) -> bool:
    """Reuse the previous save's folder of the same variant (hard links: a variant's files are
    never changed in place, only replaced), so an autosave after every job does not rewrite
    every variant. False when there is none to reuse."""
    import os
    import shutil

    try:
        meta = read_json(old / "variant.json", "")
    except StudioError:
        return False
    if not (isinstance(meta, dict) and meta.get("name") == variant.name
            and meta.get("created") == variant.created):
        return False
    new.mkdir(parents=True)
    for file in old.iterdir():
        if not file.is_file():
            return False
        try:
            os.link(file, new / file.name)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(file, new / file.name)
    return True


# --- opening ---------------------------------------------------------------------------------

@dataclass
class RestoredSession:
    session: Any                     # session.Session, its handle opened
    window: dict
    notes: list[str] = field(default_factory=list)


def read_session(path: str | Path) -> tuple[dict, dict]:
    """(session.json's document, its arrays), checked: format, version, structure."""
    from safetensors.torch import load_file

    from studio.core.file_checks import safetensors_header

    path = Path(path)
    doc = read_json(path / "session.json", f"{path} is not a session (it has no session.json).")
    if not isinstance(doc, dict) or doc.get("format") != SESSION_FORMAT:
        raise StudioError(f"{path} is not a Compression Studio session.")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StudioError(f"{path} is not a valid session: its version is {version!r}.")
    if version > SESSION_VERSION:
        raise StudioError(f"{path.name} was saved by a newer Compression Studio (session "
                          f"version {version}); this one reads version {SESSION_VERSION} and "
                          f"older. Update the studio to open it.")
    model = doc.get("model")
    if (not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in
                                                ("source", "architecture", "fingerprint"))
            or not isinstance(doc.get("variants", {}), dict)
            or not all(isinstance(k, str) and isinstance(v, str)
                       for k, v in doc.get("variants", {}).items())):
        raise StudioError(f"{path} is not a valid session: its model or variants are malformed.")
    arrays_file = path / "arrays.safetensors"
    safetensors_header(arrays_file) if arrays_file.is_file() else None
    try:
        arrays = load_file(str(arrays_file)) if arrays_file.is_file() else {}
    except Exception as exc:  # safetensors' own refusal
        raise StudioError(f"{arrays_file} could not be read: {exc}") from None
    return doc, arrays


def open_session_job(path: str | Path, model: str | None = None) -> Job[RestoredSession]:
    """Re-open a saved session: its model (from where it was, or `model` when the user located
    it elsewhere), checked to be the same weights, then its plan, results and variants."""
    from studio.core.models import open_model_job
    from studio.core.plan import Plan
    from studio.core.session import Session
    from studio.core.variant import load_variant

    path = Path(path).expanduser()
    doc, arrays = read_session(path)
    saved = doc["model"]
    source = model or saved["source"]
    if source != "demo" and not Path(source).exists():
        raise ModelMoved(f"The session's model is no longer at {source}: locate it (the same "
                         f"weights), or open the session with --model PATH.", saved["source"])
    yield Progress(0, 3, f"Opening the session's model {Path(source).name}")
    handle = yield from open_model_job(source)
    if model_fingerprint(handle) != saved["fingerprint"]:
        raise StudioError(f"{source} is not the model this session was saved with (its "
                          f"weights differ): results computed on the other weights would be "
                          f"wrong here.")
    yield Progress(1, 3, "Restoring results")
    classes, notes = result_types(), []
    try:
        plan = Plan.from_json(doc.get("plan"))
        results = {}
        for key, value in (doc.get("results") or {}).items():
            results[key] = decode(value, arrays, classes)
        runs = decode(doc.get("runs") or [], arrays, classes)
        window = decode(doc.get("window") or {}, arrays, classes)
    except StudioError as exc:
        raise StudioError(f"{path} is not a valid session: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StudioError(f"{path} is not a valid session: {type(exc).__name__}: {exc}") from None
    if not isinstance(runs, list) or not isinstance(window, dict):
        raise StudioError(f"{path} is not a valid session: runs or window state malformed.")
    variants = {}
    for i, (name, folder) in enumerate(doc.get("variants", {}).items()):
        yield Progress(2, 3, f"Restoring variant {name}")
        where = (path / folder).resolve()
        if path.resolve() not in where.parents:
            raise StudioError(f"{path} is not a valid session: variant {name} lies outside it.")
        variants[name] = load_variant(where, handle)
    session = Session(handle=handle, plan=plan, results=results, variants=variants, runs=runs)
    if model and model != saved["source"]:
        notes.append(f"The model was found at {model} (saved from {saved['source']}).")
    yield Progress(3, 3, f"Restored {path.name}")
    return RestoredSession(session, window, notes)


# --- autosave and crash recovery -------------------------------------------------------------
# The window autosaves after every finished job. While it runs, a marker holding its process id
# sits beside the autosave; a clean exit removes it. A marker whose process is gone means the
# last run crashed or was killed: the next start offers the autosave back.

def autosave_path() -> Path:
    from studio.core.files import cache_root
    return cache_root() / f"autosave{SUFFIX}"


def _marker() -> Path:
    return autosave_path().with_name("running.pid")


def start_run() -> Path | None:
    """Mark this process as running; returns the autosave of a run that crashed, if any."""
    import os

    from studio.core.files import _alive, write_text_atomic

    crashed = None
    marker = _marker()
    if marker.is_file():
        text = marker.read_text(errors="replace").strip()
        pid = int(text) if text.isdigit() else 0
        if (not pid or not _alive(pid)) and (autosave_path() / "session.json").is_file():
            crashed = autosave_path()
    write_text_atomic(marker, str(os.getpid()))
    return crashed


def end_run() -> None:
    """A clean exit: nothing to restore next time."""
    _marker().unlink(missing_ok=True)


def autosave(session, window: dict | None = None, cache: EncodeCache | None = None,
             between_steps=None) -> SavedSession | None:
    """Save `session` as the autosave (nothing when no model is open). `cache`: the encodings
    of earlier autosaves; `between_steps(progress)` runs between the save's steps."""
    if session.handle is None:
        return None
    return run(save_session_job(session, autosave_path(), window, cache), between_steps)
