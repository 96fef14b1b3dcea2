"""De-quantize a GGUF straight from its tensors into a safetensors model folder.

transformers' GGUF loader parses the whole key/value section with gguf-py's `GGUFReader`
(every vocabulary string a NumPy view: ~15 s on the demo) three times (config, tokenizer,
weights) and builds a randomly initialised float model before it loads the weights. Here the
header is walked once with transformers' own fast metadata reader, the config is rebuilt from
those keys with transformers' mapping tables, and each tensor is read from a memory map and
de-quantized by gguf-py (`gguf.quants.dequantize`, what transformers' loader calls), two
threads at a time. The GGUF -> HF names and the per-architecture fix-ups (llama's q/k row
permutation undone, Gemma's `norm + 1`) are transformers' own `TensorProcessor`s, so the
weights are the loader's bit for bit (tests compare them on a tiny GGUF and the demo).

Architectures whose config the legacy reader patches by hand (t5, stablelm, lfm2, MoE...) are
not `FAST_ARCHS`: they keep the transformers path (`gguf_convert.convert_with_transformers`).

Both ways run in the opening process (jobs: progress per tensor, cancelled between tensors;
a child process paid torch's and transformers' imports and the model class's a second time,
about a third of a first open):
- a model held in memory (the demo) is read whole (`dequantize_job`), built from those tensors,
  and its folder written behind (`write_behind`);
- a model that will be streamed (`models.choose_streaming`) is written into its folder tensor
  by tensor (`convert_fast_job`): each tensor read with file reads, de-quantized (two threads)
  and put at its place in the safetensors file, whose header is known from the GGUF's tensor
  table before any tensor is read (`export.safetensors_stream.Writer`). A few tensors are in
  memory at a time, not the model (a 3B model's Q8_0 GGUF: docs/decisions/streaming.md).
The cache is float32, not bf16: a Q4/Q5/Q8 value is a float16 scale times a small integer (plus
an offset), which bf16's 8-bit mantissa does not hold exactly; the cache must give the weights
transformers' loader gives, bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.core.jobs import Job, Progress

log = logging.getLogger(__name__)

# GGUF architectures whose config the legacy reader builds from its generic key table alone.
FAST_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
WORKERS = 2


def supported(path: Path) -> bool:
    from studio.core.gguf_header import read_keys

    try:
        return read_keys(path, {"general.architecture"}).get("general.architecture") in FAST_ARCHS
    except (OSError, ValueError):
        return False


def convert_fast(path: Path, folder: Path) -> None:
    """The cached folder for `path` (config, weights, tokenizer), written atomically."""
    from studio.core.jobs import run

    run(convert_fast_job(path, folder))


def convert_fast_job(path: Path, folder: Path) -> Job[None]:
    """`convert_fast` as a job, for a model that will be opened streamed: each tensor is
    de-quantized and written straight into the cache's safetensors file (`Writer`), so memory
    holds a few tensors (`memory.estimate_streamed_convert`), never the model. Yields Progress
    per tensor; cancelled between tensors, it leaves no folder (`atomic_dir`)."""
    import torch

    from studio.core.export.safetensors_stream import TensorSpec, Writer
    from studio.core.files import atomic_dir

    header = read_header(path)
    entries = locate(header.tables, mapped=False)
    mapping = gguf_to_hf_names(header.skeleton, header.architecture)
    # Names and shapes are the table's: known before any tensor is read (the fix-ups of
    # FAST_ARCHS keep both; the writer refuses a tensor that differs from its declaration).
    specs = {mapping[e.name]: TensorSpec(torch.float32, e.shape) for e in entries
             if e.name in mapping}
    with atomic_dir(folder) as tmp:
        yield Progress(0, len(entries), f"Reading {path.name}'s vocabulary")
        write_config(tmp, header.config, header.can_generate,
                     gguf_tokenizer(path, header.config_dict))
        one = dequantizer(header.architecture, header.config_dict, mapping)
        with Writer(Path(tmp) / "model.safetensors", specs, {"format": "pt"}) as out, \
                contextlib.closing(in_order(one, entries, ahead=WORKERS)) as pairs:
            for i, pair in enumerate(pairs):
                if pair is not None:
                    out.put(*pair)
                del pair   # (the next tensor is de-quantized while this one goes)
                # (the count first: a status bar cuts a long file name's end)
                yield Progress(i + 1, len(entries), f"Tensor {i + 1} of {len(entries)} "
                                                    f"de-quantized into the cache of "
                                                    f"{path.name} (first open only)")


@dataclass
class Header:
    """What a GGUF's header says, read before any tensor."""
    architecture: str
    config: object                   # transformers' PretrainedConfig
    config_dict: dict                # the dict it was made from (for the tokenizer's reader)
    skeleton: object                 # the model on the meta device
    tables: list                     # every part's tensor table (`gguf_parts.tensor_tables`)

    @property
    def can_generate(self) -> bool:
        return self.skeleton.can_generate()


def read_header(path: Path) -> Header:
    import torch
    from transformers import AutoConfig
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from studio.core.gguf_parts import tensor_tables
    from studio.core.model_build import skeleton as meta_model

    metadata, names = read_gguf_metadata(str(path))   # (a split's first file: all its keys)
    tables = tensor_tables(path)
    names = [entry[0] for _, entries, _ in tables for entry in entries]
    config_dict = gguf_config(metadata, names)
    config = AutoConfig.for_model(**config_dict)   # what AutoConfig.from_pretrained makes
    skeleton = meta_model(config)
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    return Header(metadata["general.architecture"], config, config_dict, skeleton, tables)


@dataclass
class Dequantized:
    """A GGUF read into what a Hugging Face folder holds."""
    config: object                   # transformers' PretrainedConfig
    config_dict: dict                # the dict it was made from (for the tokenizer's reader)
    tensors: dict                    # {state-dict key: float32 tensor}; a tied head left out
    can_generate: bool
    tokenizer: object | None = None
    tokenizer_future: Future | None = None   # set while `write_behind` makes it


def dequantize_job(path: Path) -> Job[Dequantized]:
    """The GGUF's config and float32 tensors, read in this process (nothing written)."""
    header = read_header(path)
    tensors = yield from read_tensors_job(path, header.architecture, header.skeleton,
                                          header.config_dict, header.tables)
    return Dequantized(header.config, header.config_dict, tensors, header.can_generate)


def gguf_tokenizer(path: Path, config_dict: dict):
    """transformers' tokenizer for the GGUF's vocabulary (~2 s on the demo), or None."""
    from transformers import AutoTokenizer

    with fast_config(path, config_dict):
        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:  # a GGUF without a usable vocabulary still gives weights
            log.warning("no tokenizer from %s: %s", path.name, exc)
            return None


def write_behind(done: Dequantized, path: Path, folder: Path) -> Future:
    """Make the tokenizer, then write the cached folder, on a thread, while the model that was
    built from `done`'s tensors is already in use (~3 s of a first open off its path). The
    future gives the tokenizer. The thread is not a daemon: a process waits for it before it
    exits, so a one-shot command still leaves the cache for the next open (`wait_for_cache`)."""
    tokenizer: Future = Future()

    def work() -> None:
        done.tokenizer = gguf_tokenizer(path, done.config_dict)
        tokenizer.set_result(done.tokenizer)
        try:
            write_folder(done, folder)
        except Exception:   # the next open de-quantizes again; nothing else is lost
            log.warning("the cache of %s was not written", path.name, exc_info=True)

    thread = threading.Thread(target=work, name=f"cache {path.name}", daemon=False)
    with _WRITERS_LOCK:
        _WRITERS[folder] = thread
    thread.start()
    done.tokenizer_future = tokenizer
    return tokenizer


def wait_for_cache(folder: Path) -> None:
    """Return once no thread of this process is writing `folder`."""
    with _WRITERS_LOCK:
        thread = _WRITERS.pop(folder, None)
    if thread is not None:
        thread.join()


_WRITERS: dict[Path, threading.Thread] = {}
_WRITERS_LOCK = threading.Lock()


def write_folder(done: Dequantized, folder: Path) -> None:
    """The model folder transformers' loader would save, written atomically."""

    from studio.core.export.safetensors_stream import save as save_file
    from studio.core.files import atomic_dir

    with atomic_dir(folder) as tmp:
        write_config(tmp, done.config, done.can_generate, done.tokenizer)
        save_file(done.tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})


def write_config(folder, config, can_generate: bool, tokenizer) -> None:
    """A cache folder's files besides its weights: config, generation config, tokenizer."""
    from transformers import GenerationConfig

    config.save_pretrained(folder)
    if can_generate:
        GenerationConfig.from_model_config(config).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def gguf_config(metadata: dict, tensor_names) -> dict:
    """The config dict transformers' legacy GGUF reader builds, for FAST_ARCHS (same tables,
    same rules; a test compares the two on every architecture it can write)."""
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_CONFIG_DEFAULTS_MAPPING,
        GGUF_TO_TRANSFORMERS_MAPPING,
    )

    architecture = metadata["general.architecture"]
    if architecture not in FAST_ARCHS:
        raise ValueError(f"{architecture} is read by transformers' own GGUF loader")
    # The legacy reader compares `"mistral" in [general.name]`: the whole name, not a part.
    updated = "mistral" if architecture == "llama" and metadata.get("general.name") == "mistral" \
        else architecture
    config = {"tie_word_embeddings": all(name != "output.weight" for name in tensor_names)}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(
            updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {}).items():
        config.setdefault(key, value)
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for gguf_key, value in metadata.items():
        gguf_key = gguf_key.replace(architecture, updated)
        prefix, _, config_key = gguf_key.partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        if prefix in renames and config_key in renames[prefix]:
            target = renames[prefix][config_key]
            if target is not None and target != -1:
                config[target] = value
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]   # the vocabulary's length
    return config


@contextlib.contextmanager
def fast_config(path: Path, config_dict: dict):
    """transformers' AutoConfig / AutoTokenizer with `gguf_file=` read the config through the
    legacy loader (a full GGUFReader parse each). While this is open, that call returns the
    dict built here for this file; any other call goes through unchanged. Runs only in the
    conversion's own child process."""
    from transformers import modeling_gguf_pytorch_utils as legacy

    original = legacy.load_gguf_checkpoint
    target = str(path.resolve())

    def load(gguf_path, return_tensors=False, **kwargs):
        if not return_tensors and str(Path(gguf_path).resolve()) == target:
            return {"config": dict(config_dict)}
        return original(gguf_path, return_tensors=return_tensors, **kwargs)

    legacy.load_gguf_checkpoint = load
    try:
        yield
    finally:
        legacy.load_gguf_checkpoint = original


def gguf_to_hf_names(skeleton, architecture: str) -> dict[str, str]:
    """{GGUF tensor name: HF state-dict key}: gguf-py's tensor map run forward over the model's
    keys, as the exporter does (`export.gguf_tensors.map_names`) and inverted. (transformers'
    `get_gguf_hf_weights_map` gives the same answer for these architectures but walks every
    sub-module's state dict again: 38 s on the demo.)"""
    import gguf

    from studio.core.export.gguf_tensors import gguf_arch_enum

    name_map = gguf.get_tensor_name_map(gguf_arch_enum(architecture),
                                        skeleton.config.num_hidden_layers)
    mapping = {}
    for key in skeleton.state_dict():
        module, dot, suffix = key.rpartition(".")
        if suffix not in ("weight", "bias"):
            module, dot, suffix = key, "", ""
        base = name_map.get_name(module)
        if base is not None:
            mapping[base + dot + suffix] = key
    return mapping


def read_tensors(path: Path, architecture: str, skeleton, config_dict: dict) -> dict:
    """{HF state-dict key: float32 tensor} for every GGUF tensor the model has a name for."""
    from studio.core.jobs import run

    return run(read_tensors_job(path, architecture, skeleton, config_dict))


def read_tensors_job(path: Path, architecture: str, skeleton, config_dict: dict,
                     tables: list | None = None):
    """`read_tensors` as a job: one Progress per tensor de-quantized (two threads at a time).
    `tables`: every part's tensor table (`gguf_parts.tensor_tables`; read here when None).
    Every tensor is read from a map of its file and kept (the model is built from them)."""
    from studio.core.gguf_parts import tensor_tables

    entries = locate(tables or tensor_tables(path), mapped=True)
    one = dequantizer(architecture, config_dict, gguf_to_hf_names(skeleton, architecture))
    pairs = []
    # all submitted at once (the results are all kept anyway)
    with contextlib.closing(in_order(one, entries, ahead=len(entries))) as done:
        for i, pair in enumerate(done):
            yield Progress(i, len(entries), f"De-quantizing {path.name}: tensor {i + 1} of "
                                            f"{len(entries)} (first open only, cached after)")
            if pair is not None:
                pairs.append(pair)
    # A tied head has no tensor of its own in the file: save_pretrained would not write it.
    return dict(pairs)


@dataclass(frozen=True)
class Located:
    """One tensor of a GGUF (or of one part of a split GGUF), where its bytes are."""
    file: Path
    blob: np.ndarray | None   # the file's map (read whole), or None: read with file reads
    start: int                # the tensor's first byte in the file
    name: str
    shape: tuple              # NumPy order
    ggml_type: int


def locate(tables: list, mapped: bool) -> list[Located]:
    """Every tensor of every part, in file order. `mapped`: through a map of each file, a
    plain ndarray view of it (NumPy operations on a np.memmap subclass are slower); else each
    tensor is read with file reads (`raw_bytes`)."""
    located = []
    for file, table, data_start in tables:
        blob = np.memmap(file, mode="r", dtype=np.uint8).view(np.ndarray) if mapped else None
        located.extend(Located(Path(file), blob, data_start + offset, name,
                               tuple(int(n) for n in shape),
                               ggml_type) for name, shape, ggml_type, offset in table)
    return located


def raw_bytes(tensor: Located, first_row: int = 0, rows: int | None = None) -> np.ndarray:
    """The tensor's stored bytes as rows of its last dimension (what gguf-py's reader hands
    its de-quantizer), rows `first_row` to `first_row + rows`. From the map, a view; else a
    file read: a map's pages stay resident (counted in the process's RSS) for as long as the
    map lives, and a first open reads every byte of a file of several GB once."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
    shape = tensor.shape
    all_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_bytes = int(np.prod(shape)) // block * block_bytes // all_rows
    rows = all_rows - first_row if rows is None else rows
    start = tensor.start + first_row * row_bytes
    if tensor.blob is not None:
        return tensor.blob[start: start + rows * row_bytes].reshape(rows, row_bytes)
    return np.fromfile(tensor.file, dtype=np.uint8, count=rows * row_bytes,
                       offset=start).reshape(rows, row_bytes)


# A tensor larger than this is de-quantized a block of rows at a time into its float32 result:
# gguf-py's de-quantizers make float32 temporaries as large as their input (a 3B model's
# embedding: 1.5 GiB each). Every tensor of the demo is smaller, and is read as before.
CHUNK_ELEMENTS = 32 * 2**20


def dequantizer(architecture: str, config_dict: dict, mapping: dict):
    """`one(located)` -> (HF key, float32 tensor), or None for a tensor the model has no
    name for: gguf-py's de-quantizer, then transformers' per-architecture fix-ups (llama's
    q/k permutation undone, Gemma's norm + 1)."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    parsed = {"config": config_dict, "tensors": {}}

    def one(tensor: Located):
        kind = GGMLQuantizationType(tensor.ggml_type)
        count = int(np.prod(tensor.shape))
        if count <= CHUNK_ELEMENTS or len(tensor.shape) < 2:
            weights = dequantize(raw_bytes(tensor), kind).reshape(tensor.shape)
        else:   # (values identical: every row de-quantizes on its own)
            weights = np.empty(tensor.shape, dtype=np.float32)
            flat = weights.reshape(-1, tensor.shape[-1])
            step = max(1, CHUNK_ELEMENTS // tensor.shape[-1])
            for first in range(0, flat.shape[0], step):
                part = raw_bytes(tensor, first, min(step, flat.shape[0] - first))
                flat[first: first + part.shape[0]] = dequantize(part, kind).reshape(
                    part.shape[0], -1)
        result = processor.process(weights=weights, name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name not in mapping:
            return None
        if result.name != tensor.name:
            raise ValueError(f"{tensor.name} was renamed {result.name} by its fix-up")
        # a copy only when needed: a float32 tensor viewed in the file's map is read-only
        values = np.require(result.weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
        return mapping[result.name], torch.from_numpy(values)

    return one


def in_order(fn, items: list, ahead: int):
    """fn(item) for each item on WORKERS threads, the results in order; at most `ahead`
    submitted beyond the one being handed out. Stopped (cancelled), the work not started is
    dropped and the work under way finished before it returns."""
    from collections import deque

    pool = ThreadPoolExecutor(WORKERS)
    try:
        pending = deque(pool.submit(fn, item) for item in items[:ahead])
        following = iter(items[ahead:])
        while pending:
            result = pending.popleft().result()
            item = next(following, None)
            if item is not None:
                pending.append(pool.submit(fn, item))
            yield result
            del result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

