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

`convert_fast_job` runs in the opening process (a job: progress per tensor, cancelled between
tensors, nothing written until every tensor is read): a child process paid torch's and
transformers' imports and the model class's a second time, about a third of a first open.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.core.jobs import Job

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


def convert_fast_job(path: Path, folder: Path) -> Job[Dequantized]:
    """`convert_fast` as a job: yields Progress per tensor read; cancelled, it writes nothing.
    Returns what it wrote."""
    done = yield from dequantize_job(path)
    done.tokenizer = gguf_tokenizer(path, done.config_dict)
    write_folder(done, folder)
    return done


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
    import torch
    from transformers import AutoConfig
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from studio.core.model_build import skeleton as meta_model

    from studio.core.gguf_parts import tensor_tables

    metadata, names = read_gguf_metadata(str(path))   # (a split's first file: all its keys)
    tables = tensor_tables(path)
    names = [entry[0] for _, entries, _ in tables for entry in entries]
    config_dict = gguf_config(metadata, names)
    config = AutoConfig.for_model(**config_dict)   # what AutoConfig.from_pretrained makes
    skeleton = meta_model(config)
    tensors = yield from read_tensors_job(path, metadata["general.architecture"], skeleton,
                                          config_dict, tables)
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    return Dequantized(config, config_dict, tensors, skeleton.can_generate())


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
    from transformers import GenerationConfig

    from studio.core.export.safetensors_stream import save as save_file
    from studio.core.files import atomic_dir

    with atomic_dir(folder) as tmp:
        done.config.save_pretrained(tmp)
        if done.can_generate:
            GenerationConfig.from_model_config(done.config).save_pretrained(tmp)
        save_file(done.tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        if done.tokenizer is not None:
            done.tokenizer.save_pretrained(tmp)


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
    `tables`: every part's tensor table (`gguf_parts.tensor_tables`; read here when None)."""
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    from studio.core.gguf_parts import tensor_tables

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    mapping = gguf_to_hf_names(skeleton, architecture)
    # (blob, data start, tensor record) of every tensor of every part, in file order. A plain
    # ndarray view of each map: NumPy operations on a np.memmap subclass are slower.
    entries = []
    for file, table, data_start in tables or tensor_tables(path):
        blob = np.memmap(file, mode="r", dtype=np.uint8).view(np.ndarray)
        entries.extend((blob, data_start, entry) for entry in table)
    parsed = {"config": config_dict, "tensors": {}}

    def one(located):
        blob, data_start, (name, shape, ggml_type, offset) = located
        kind = GGMLQuantizationType(ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[kind]
        start = data_start + offset
        raw = blob[start: start + int(np.prod(shape)) // block * block_bytes]
        # The byte shape gguf-py's reader hands its de-quantizer: rows of the last dimension.
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        weights = dequantize(raw.reshape(rows, -1), kind).reshape(shape)
        result = processor.process(weights=weights, name=name,
                                   tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name not in mapping:
            return None
        return mapping[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))

    from studio.core.jobs import Progress

    pairs = []
    pool = ThreadPoolExecutor(WORKERS)
    try:
        for i, pair in enumerate(pool.map(one, entries)):
            yield Progress(i, len(entries), f"De-quantizing {path.name}: tensor {i + 1} of "
                                            f"{len(entries)} (first open only, cached after)")
            if pair is not None:
                pairs.append(pair)
    finally:   # cancelled: the tensors not started are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    # A tied head has no tensor of its own in the file: save_pretrained would not write it.
    return dict(pairs)
