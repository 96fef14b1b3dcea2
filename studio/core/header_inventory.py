"""The layer list of a model from its files' headers alone, before any weight is read.

Opening a model reads (or de-quantizes) every weight, which takes seconds to minutes; the list
of its layers is in the headers: safetensors' JSON header, a GGUF's tensor table. This module
reads them and returns the same `LayerInfo` records as `studio.core.layers.inventory`, so the
window can list the layers at once (and a command could, without loading). It is a preview:
the inventory of the loaded model replaces it, and a detail the header cannot tell (a GGUF
name no mapping knows, a tied head a config does not declare) may differ.

A GGUF first opened has llama.cpp's names ("blk.3.attn_q"); they are mapped to the model's own
with gguf-py's tensor map, choosing the transformers naming of the architectures the studio
opens ("model.layers.3.self_attn.q_proj"). A GGUF opened before is read from its cached folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from studio.core.file_checks import safetensors_header
from studio.core.gguf_header import read_keys, tensor_table
from studio.core.jobs import Progress
from studio.core.layers import ROLES, LayerInfo, place

# safetensors dtype -> (torch's name, bytes per value)
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
           "BF16": ("bfloat16", 2), "I8": ("int8", 1), "U8": ("uint8", 1)}
_EMBEDDING_LEAVES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in",
                     "tok_embeddings", "embed_positions")
_HEAD_NAMES = ("lm_head", "embed_out")
# GGUF base names whose transformers module differs by architecture (the map lists both).
_GGUF_OVERRIDES = {("phi3", "ffn_up"): "mlp.gate_up_proj"}


def header_inventory(source: str | Path) -> list[LayerInfo]:
    """Every weight layer of `source` (folder, .gguf or "demo") in module order, lm_head last,
    read from headers only. Raises ModelLoadError as opening would for a missing/bad file."""
    from studio.core.models import gguf_cache_folder, resolve_source

    kind, path = resolve_source(source)
    if kind == "gguf":
        cached = gguf_cache_folder(path)
        if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
            return folder_inventory(cached)
        return gguf_inventory(path)
    return folder_inventory(path)


def folder_inventory(folder: Path) -> list[LayerInfo]:
    """From the safetensors headers of a model folder (and config.json for a tied head)."""
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for key, entry in safetensors_header(file).items():
            if key != "__metadata__":
                tensors[key] = (tuple(entry["shape"]), entry["dtype"])
    config = _config(folder)
    transposed = config.get("model_type") == "gpt2"   # Conv1D: weights stored [in, out]
    weights = {key[: -len(".weight")]: shape for key, (shape, _) in tensors.items()
               if key.endswith(".weight") and len(shape) == 2}
    dtypes = {key[: -len(".weight")]: dtype for key, (_, dtype) in tensors.items()}
    biases = {key[: -len(".bias")] for key in tensors if key.endswith(".bias")}
    tied = config.get("tie_word_embeddings", True)
    return _layers(weights, biases, dtypes, tied, transposed)


def gguf_inventory(path: Path) -> list[LayerInfo]:
    """From a GGUF's tensor table, names mapped to the transformers model's; float32, as the
    studio de-quantizes."""
    import gguf

    from studio.core.export.gguf_tensors import gguf_arch_enum
    from studio.core.gguf_parts import parts

    arch = read_keys(path, {"general.architecture"}).get("general.architecture")
    entries = [entry for part in parts(path) for entry in tensor_table(part)[0]]   # (a split)
    blocks = 1 + max((int(n.split(".")[1]) for n, *_ in entries if n.startswith("blk.")),
                     default=0)
    try:
        name_map = gguf.get_tensor_name_map(gguf_arch_enum(arch), blocks)
    except (StopIteration, KeyError):
        name_map = None
    candidates: dict[str, list[str]] = {}
    if name_map is not None:
        for hf_name, (_tensor, gguf_name) in name_map.mapping.items():
            candidates.setdefault(gguf_name, []).append(hf_name)
    weights, biases = {}, set()
    for name, shape, _type, _offset in entries:
        base, _, suffix = name.rpartition(".")
        module = _hf_module(arch, base, candidates.get(base, []))
        if suffix == "weight" and len(shape) == 2:
            weights[module] = shape
        elif suffix == "bias":
            biases.add(module)
    return _layers(weights, biases, {}, True, False, default_dtype="F32")


def _hf_module(arch: str | None, gguf_base: str, candidates: list[str]) -> str:
    """The transformers module name for a GGUF tensor base name (itself when none fits)."""
    parts = gguf_base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and (arch, parts[2]) in _GGUF_OVERRIDES:
        return f"model.layers.{parts[1]}.{_GGUF_OVERRIDES[(arch, parts[2])]}"
    for name in candidates:
        if name.startswith("model.layers.") and name.split(".")[3] in ("self_attn", "mlp") \
                and name.endswith("_proj") and "layers.layers" not in name:
            return name
    for wanted in ("model.embed_tokens", "lm_head"):
        if wanted in candidates:
            return wanted
    return gguf_base


def _layers(weights: dict[str, tuple[int, ...]], biases: set[str], dtypes: dict[str, str],
            tied: bool, transposed: bool, default_dtype: str = "F32") -> list[LayerInfo]:
    layers, head = [], None
    for name, shape in weights.items():
        leaf = name.rsplit(".", 1)[-1]
        dtype, size = _DTYPES.get(dtypes.get(name, default_dtype), ("float32", 4))
        if leaf in _HEAD_NAMES:
            kind, role, block = "lm_head", "lm_head", None
        elif leaf in _EMBEDDING_LEAVES:
            kind, role, block = "embedding", "embedding", None
        else:
            block, role = place(name)
            kind = "conv1d" if transposed else "linear"
            if transposed:
                shape = tuple(reversed(shape))
        params = shape[0] * shape[1] + (shape[0] if name in biases else 0)
        info = LayerInfo(name=name, block=block, role=role, kind=kind,
                         shape=(int(shape[0]), int(shape[1])), params=int(params), dtype=dtype,
                         bytes=int(params * size),
                         quantizable=kind in ("linear", "conv1d") and block is not None)
        if kind == "lm_head":
            head = info
        else:
            layers.append(info)
    layers.sort(key=_module_order)
    embedding = next((info for info in layers if info.kind == "embedding"), None)
    if head is None and tied and embedding is not None:   # the head shares the embedding
        head = LayerInfo(name="lm_head", block=None, role="lm_head", kind="lm_head",
                         shape=embedding.shape, params=embedding.params, dtype=embedding.dtype,
                         bytes=embedding.bytes, quantizable=False, tied_to=embedding.name)
    return layers + ([head] if head is not None else [])


def _module_order(info: LayerInfo) -> tuple:
    """Embeddings, then block by block in the order a block runs its layers."""
    if info.kind == "embedding":   # the token embedding, then a position embedding
        positional = info.name.rsplit(".", 1)[-1] in ("wpe", "embed_positions")
        return (-1, int(positional), info.name)
    block = info.block if info.block is not None else 1 << 30
    return (block, ROLES.index(info.role), info.name)


def _config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def header_inventory_job(source: str | Path):
    """`header_inventory` as a Job, for the window's worker (one step: it takes well under a
    second, after which the long open job follows)."""
    yield Progress(0, 1, "Reading the layer list from the file's header")
    return header_inventory(source)
