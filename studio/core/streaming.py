"""Weights kept as stored: a model whose tensors stay in their safetensors files until a layer
runs, for models larger than memory allows in float32 (issue 17).

    store = WeightStore(folder)              # every shard's header, the index checked
    model = streamed_model(config, store)    # built on the meta device; buffers real
    model(input_ids=...)                     # each layer reads its weights as it runs

A streamed model's parameters are `StoredParameter`s: meta tensors (shape and stored dtype,
no data) that know their file and offset. Every module that owns one carries a forward
pre-hook that reads its tensors from the file into float32 just before it computes and a
forward hook that lets them go after, so a forward holds one layer's float32 weights at a
time, whatever the model's size. Reads are plain file reads (not a memory map): the pages sit
in the operating system's file cache, not in the process, and a second read costs a copy.

A StoredParameter is never copied (`__deepcopy__` returns itself: nothing writes into a meta
tensor), so a copy of the model for quantization or a variant keeps streaming from the same
files. Work that changes a block's weights first makes them resident (`materialise`), which
gives that module ordinary float32 parameters the hooks then leave alone.

The hooks are module-level functions, so deep copies of modules carry them unchanged. What a
forward left behind when an exception cut it short (a hook raising to stop a forward early)
is sent back by the next layer that comes in (`_resident` holds at most RESIDENT_BYTES).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from studio.core.errors import ModelLoadError, StudioError
from studio.core.file_checks import safetensors_header
from studio.core.files import read_json

# safetensors dtype -> torch dtype the studio can compute from (read into float32)
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F64": torch.float64}
# Stored but not computed in: integer and 8-bit float tensors of quantized checkpoints.
INDEX_FILE = "model.safetensors.index.json"
# Layers a forward left resident (cut short by an exception) are sent back beyond this.
RESIDENT_BYTES = 1 << 30
# Bytes read from a file at a time when converting (one chunk exists twice, not the tensor).
READ_CHUNK = 1 << 25


class WeightStore:
    """Where every tensor of a safetensors folder lives: file, offset, dtype, shape.

    Built from the headers alone (no tensor data is read), after the index, when there is one,
    is checked against the shards: a missing shard or a tensor the index names but no shard
    holds is refused with its name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        self.bytes_read = 0      # tensor bytes read since opening (tests check opening reads none)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder.name} has no *.safetensors weights to stream.")
        for file in files:
            header = safetensors_header(file)
            start = 8 + _header_length(file)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                self.entries[key] = (file, start + entry["data_offsets"][0], entry["dtype"],
                                     tuple(entry["shape"]))
        self._check_index()

    def _check_index(self) -> None:
        index = self.folder / INDEX_FILE
        if not index.is_file():
            return
        raw = read_json(index, "", ModelLoadError)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{INDEX_FILE} is not a valid shard index (no weight_map of "
                                 f"file names).")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise ModelLoadError(f"{self.folder.name}: {len(missing)} shard(s) listed in "
                                 f"{INDEX_FILE} are missing: {', '.join(missing)}.")
        absent = sorted(k for k, f in weight_map.items()
                        if k not in self.entries or self.entries[k][0].name != f)
        if absent:
            raise ModelLoadError(f"{INDEX_FILE} names {len(absent)} tensor(s) its shards do not "
                                 f"hold, e.g. {absent[0]} (in {weight_map[absent[0]]}).")

    def __deepcopy__(self, memo) -> "WeightStore":
        return self   # one store per folder; copies of a model read the same files

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][3]

    def dtype(self, key: str) -> torch.dtype:
        return FLOAT_DTYPES[self.entries[key][2]]

    def nbytes(self, key: str) -> int:
        file, _, dtype, shape = self.entries[key]
        return math.prod(shape) * torch.empty(0, dtype=FLOAT_DTYPES.get(dtype, torch.uint8)
                                              ).element_size()

    @property
    def stored_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.entries)

    def check_dtypes(self) -> None:
        """Refuse, before any work, tensors stored in a type the studio cannot compute in."""
        odd = sorted({(e[2], k) for k, e in self.entries.items() if e[2] not in FLOAT_DTYPES})
        if odd:
            dtype, key = odd[0]
            raise ModelLoadError(f"{self.folder.name} stores {key} (and {len(odd) - 1} more) as "
                                 f"{dtype}; the studio computes from F32, F16, BF16 or F64 "
                                 f"weights only (a quantized checkpoint is not a base model).")

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `key` from its file, as a new `dtype` tensor (nothing stays mapped).
        A conversion goes READ_CHUNK bytes at a time into the result, so a large tensor never
        exists twice (an lm_head of 128256 x 3072: 1.5 GiB in float32, not 2.3)."""
        file, offset, stored, shape = self.entries[key]
        source = FLOAT_DTYPES[stored]
        size = torch.empty(0, dtype=source).element_size()
        count = math.prod(shape)
        out = torch.empty(count, dtype=dtype)
        step = max(1, READ_CHUNK // size)
        with open(file, "rb") as handle:
            for start in range(0, count, step):
                n = min(step, count - start)
                raw = np.fromfile(handle, dtype=np.uint8, count=n * size,
                                  offset=offset + start * size if start == 0 else 0)
                if raw.size != n * size:
                    raise ModelLoadError(f"{file.name} ended before {key} did: the file changed "
                                         f"since it was opened.")
                out[start: start + n].copy_(torch.from_numpy(raw).view(source))
        self.bytes_read += count * size
        return out.reshape(shape)

    def read_flat(self, key: str, start: int, count: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor `key` flattened, as `dtype` (default: as
        stored): a large tensor compared a chunk at a time is never read whole."""
        file, offset, stored, shape = self.entries[key]
        source = FLOAT_DTYPES[stored]
        size = torch.empty(0, dtype=source).element_size()
        count = max(0, min(count, math.prod(shape) - start))
        raw = np.fromfile(file, dtype=np.uint8, count=count * size, offset=offset + start * size)
        if raw.size != count * size:
            raise ModelLoadError(f"{file.name} ended before {key} did: the file changed since "
                                 f"it was opened.")
        self.bytes_read += count * size
        return torch.from_numpy(raw).view(source).to(dtype or source)

    def identity(self) -> str:
        """Names, sizes and times of the files: what a cache key needs instead of every byte."""
        from studio.core.files import files_identity

        return files_identity({e[0] for e in self.entries.values()})


def _header_length(file: Path) -> int:
    with open(file, "rb") as handle:
        return int(np.frombuffer(handle.read(8), dtype="<u8")[0])


class StoredParameter(nn.Parameter):
    """A meta parameter (shape and stored dtype, no data) that knows where its values are."""

    def __new__(cls, store: WeightStore, key: str):
        data = torch.empty(store.shape(key), dtype=store.dtype(key), device="meta")
        param = super().__new__(cls, data, requires_grad=False)
        param.store, param.key = store, key
        return param

    def __deepcopy__(self, memo) -> "StoredParameter":
        return self

    def __reduce_ex__(self, protocol):  # never pickled with its data (it has none)
        raise TypeError("A streamed model's parameters cannot be pickled.")

    def read(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _counted(self.store.read(self.key, dtype))


# What is resident from the files right now and at most since `reset_peak` (bytes of tensors
# read by StoredParameter.read and still alive): the unit a job's memory scales with.
_live = {"now": 0, "peak": 0}


def _counted(tensor: torch.Tensor) -> torch.Tensor:
    size = tensor.numel() * tensor.element_size()
    _live["now"] += size
    _live["peak"] = max(_live["peak"], _live["now"])
    weakref.finalize(tensor.untyped_storage(), _uncount, size)
    return tensor


def _uncount(size: int) -> None:
    _live["now"] -= size


def reset_peak() -> None:
    _live["peak"] = _live["now"]


def peak_read_bytes() -> int:
    """The most bytes read from the files that were alive at once since `reset_peak`."""
    return _live["peak"]


# --- building a streamed model ---------------------------------------------------------------

def streamed_model(config, store: WeightStore) -> nn.Module:
    """The model `config` describes with every parameter a StoredParameter of `store` and
    every buffer real (rotary frequencies and masks are computed, not stored); persistent
    buffers the files hold are read. Tensors the model needs but no file holds are refused,
    naming them."""
    from transformers import AutoModelForCausalLM

    store.check_dtypes()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.eval()
    prefix = getattr(model, "base_model_prefix", "")
    stored: dict[int, StoredParameter] = {}
    missing = []
    for name, module in list(model.named_modules()):
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{name}.{attr}" if name else attr
            if id(param) not in stored:
                key = _stored_key(full, prefix, store)
                if key is None:
                    missing.append(full)
                    continue
                if store.shape(key) != tuple(param.shape):
                    raise ModelLoadError(f"{store.folder.name} stores {key} as "
                                         f"{list(store.shape(key))}; the config makes it "
                                         f"{list(param.shape)}.")
                stored[id(param)] = StoredParameter(store, key)
            module._parameters[attr] = stored[id(param)]
    if missing:
        raise ModelLoadError(f"{store.folder.name}'s files do not hold {len(missing)} tensor(s) "
                             f"the model needs, e.g. {missing[0]}.")
    _real_buffers(model, config, store, prefix)
    for module in model.modules():
        watch(module)
    trim_after_blocks(model)
    model.requires_grad_(False)
    return model


def trim_after_blocks(model: nn.Module) -> None:
    """After each decoder block runs, the C library's heap gives back what its layers freed
    (`memory.release_freed_memory`). Without it a streamed forward's resident size grew with
    depth, ~9 MiB a block of the 3B (evaluating a variant: 2414 MiB at 2 blocks, 2638 at 28),
    all of it freed temporaries glibc kept. Copies of the model (a variant's) keep the hook."""
    from studio.core.quant.blocks import decoder_blocks

    try:
        _, blocks = decoder_blocks(model)
    except StudioError:   # (no stack of blocks the studio knows: nothing to trim between)
        return
    for block in blocks:
        if _trim not in block._forward_hooks.values():
            block.register_forward_hook(_trim)


def _trim(module: nn.Module, args, output) -> None:
    from studio.core.memory import release_freed_memory

    release_freed_memory()


def watch(module: nn.Module) -> None:
    """Give `module` the hooks that read its stored parameters as it runs (once; none when it
    owns no StoredParameter). For modules made after opening: a variant's coded layers."""
    if not any(isinstance(p, StoredParameter) for p in module._parameters.values()):
        return
    if _bring_in not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_bring_in)
    if _send_back not in module._forward_hooks.values():
        module.register_forward_hook(_send_back)


def _stored_key(name: str, prefix: str, store: WeightStore) -> str | None:
    """The file's name for parameter `name` (checkpoints may leave out the base model's prefix;
    a tied lm_head is stored as the embedding, which `tie_weights` already made it)."""
    if name in store:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in store:
        return name[len(prefix) + 1:]
    return None


def _real_buffers(model: nn.Module, config, store: WeightStore, prefix: str) -> None:
    """Persistent buffers the files hold are read (the rest were computed on the CPU)."""
    for name, module in model.named_modules():
        for attr, buffer in list(module._buffers.items()):
            key = _stored_key(f"{name}.{attr}" if name else attr, prefix, store)
            if buffer is not None and key is not None and store.shape(key) == tuple(buffer.shape):
                module._buffers[attr] = store.read(key, buffer.dtype)


@contextlib.contextmanager
def parameters_on_meta():
    """Within: every parameter a module registers goes to the meta device (no memory; its
    initialisation costs nothing), every buffer stays a real CPU tensor (rotary frequencies,
    embedding scales: computed from the config, not stored)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# --- bringing layers in and sending them back -------------------------------------------------

_resident: list[tuple[nn.Module, int]] = []   # modules holding read weights, oldest first


def _bring_in(module: nn.Module, args) -> None:
    swapped = module.__dict__.setdefault("_stored_swapped", {})
    size = 0
    for attr, param in list(module._parameters.items()):
        if isinstance(param, StoredParameter):
            swapped[attr] = param
            module._parameters[attr] = nn.Parameter(param.read(), requires_grad=False)
            size += 4 * param.numel()
    if size:
        _resident.append((module, size))
        while sum(s for _, s in _resident) > RESIDENT_BYTES and len(_resident) > 1:
            old, _ = _resident[0]
            _send_back(old, (), None)


def _send_back(module: nn.Module, args, output) -> None:
    swapped = module.__dict__.get("_stored_swapped")
    if swapped:
        for attr, param in swapped.items():
            module._parameters[attr] = param
        swapped.clear()
    for i, (held, _) in enumerate(_resident):
        if held is module:
            del _resident[i]
            break


STREAMING_HOOKS = (_bring_in, _send_back)


def send_back_all() -> None:
    """Everything a cut-short forward left resident goes back to its file."""
    while _resident:
        _send_back(_resident[0][0], (), None)


# --- for jobs that change weights -------------------------------------------------------------

def materialise(module: nn.Module) -> int:
    """Give every StoredParameter under `module` a float32 Parameter of its own (the hooks
    then leave it alone); bytes brought in. Parameters shared within `module` stay shared."""
    made: dict[int, nn.Parameter] = {}
    size = 0
    for sub in module.modules():
        for attr, param in list(sub._parameters.items()):
            if isinstance(param, StoredParameter):
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(param.read(), requires_grad=False)
                    size += 4 * param.numel()
                sub._parameters[attr] = made[id(param)]
    return size


def streams(model: nn.Module) -> bool:
    """True when some of `model`'s weights are read from their files as layers run."""
    return any(isinstance(p, StoredParameter) for p in model.parameters())


def real(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values: read from its file when it is a StoredParameter."""
    return tensor.read() if isinstance(tensor, StoredParameter) else tensor


def stored_bytes_per_block(model: nn.Module) -> list[int]:
    """float32 bytes of each decoder block's stored weights (the memory guard's unit)."""
    from studio.core.quant.blocks import decoder_blocks

    _, blocks = decoder_blocks(model)
    return [sum(4 * p.numel() for p in block.parameters()) for block in blocks]

