"""Re-opening the export of a streamed variant without holding the model (issue 17).

The usual verification re-opens an export whole through its consumer library: a float32 model
(12.8 GB for a 3B model), which is what streaming avoids. For a streamed variant the export is
re-opened the streamed way instead, still through the consumer's own decoding, one layer at a
time:

- compressed-tensors: the folder's model.safetensors becomes a `WeightStore` whose quantized
  linears' weights are de-compressed by compressed-tensors' own de-compressor (each config
  group with its scheme) from that layer's packed tensors when read; float tensors are read as
  stored. The model is the one transformers builds from the export's config.json, on the meta
  device (`streaming.streamed_model`): the logits check runs it a layer at a time, as the
  variant runs.
- a plain checkpoint (`hf`): the folder (one file or shards and their index) becomes a
  `WeightStore` and the model transformers builds from its config.json, streamed: its weights
  are read as stored, as any streamed model's are.
- GGUF: each tensor is de-quantized by gguf-py from the file (each file of a split GGUF), one
  at a time, and mapped back to the base model's layout (the q/k row order, Gemma's norm + 1),
  and the logits come from llama.cpp running the file in its own process (the file's real
  runtime). A split GGUF of any variant is verified this way: transformers' GGUF loader reads
  one file only.

Every quantized weight and every float tensor is compared, as for an in-memory export; only
one layer is held at a time.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from studio.core.errors import StudioError
from studio.core.export.base import Reloaded
from studio.core.jobs import Job, Progress
from studio.core.streaming import WeightStore


# --- compressed-tensors ----------------------------------------------------------------------

class DecodedStore(WeightStore):
    """An export's safetensors as a WeightStore: "X.weight" of a quantized linear X is its
    de-compressed float32 weight (read through compressed-tensors), the rest as stored."""

    def __init__(self, folder: Path, decoder) -> None:
        super().__init__(folder)
        self.decoder = decoder
        self.decoded: dict[str, tuple[list[str], tuple[int, int]]] = {}
        for group in decoder.quant_config.config_groups.values():
            for module in group.targets:   # the studio writes exact names (ct_layout)
                parts = [k for k in self.entries if k.rpartition(".")[0] == module]
                if parts:
                    self.decoded[f"{module}.weight"] = (parts, self._weight_shape(module, parts))

    def _weight_shape(self, module: str, parts: list[str]) -> tuple[int, int]:
        if f"{module}.weight_shape" in parts:   # pack-quantized: the shape is a tensor
            return tuple(int(v) for v in self._raw([f"{module}.weight_shape"])[
                f"{module}.weight_shape"])
        return self.entries[f"{module}.weight"][3]   # int-quantized: int8 codes [out, in]

    def _raw(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for file in {self.entries[key][0] for key in keys}:   # (another writer's shards may
            with safe_open(str(file), framework="pt") as handle:   # split a layer)
                out.update({key: handle.get_tensor(key) for key in keys
                            if self.entries[key][0] == file})
        return out

    def check_dtypes(self) -> None:
        """Integer tensors are the quantized layers' parts, read through the de-compressor."""

    def __contains__(self, key: str) -> bool:
        return key in self.decoded or key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.decoded[key][1] if key in self.decoded else super().shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if key in self.decoded else super().dtype(key)

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if key not in self.decoded:
            return super().read(key, dtype)
        # scales in float32, as transformers' own path has them (decoded_reload_job)
        tensors = {k: v.float() if k.endswith(".weight_scale") else v
                   for k, v in self._raw(self.decoded[key][0]).items()}
        try:
            dense = self.decoder.validate(tensors)
        except Exception as exc:   # whatever it raises: the export does not decode
            raise StudioError(f"compressed-tensors could not de-compress {key}: {exc}") from None
        return dense[key].to(dtype)


class _Lookup(Mapping):
    """Tensors by name, each read from the file when looked up (none is kept)."""

    def __init__(self, read, names: list[str]) -> None:
        self._read, self._names = read, set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self):
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def compressed_tensors_job(folder: Path, source: Path) -> Job[Reloaded]:
    """The compressed-tensors export in `folder` as a streamed model of its own config, its
    quantized layers de-compressed by compressed-tensors as they run."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer)
    from transformers import AutoConfig

    from studio.core.export.compressed_tensors import install_input_quantization
    from studio.core.export.hf_folder import tokenizer_files_equal
    from studio.core.streaming import streamed_model

    yield Progress(0, 1, "Re-opening the compressed-tensors checkpoint a layer at a time")
    try:
        decoder = CompressedTensorsDequantizer(folder, dtype=torch.float32)
    except Exception as exc:
        raise StudioError(f"compressed-tensors could not read the export's config: {exc}"
                          ) from None
    store = DecodedStore(folder, decoder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    del config.quantization_config
    try:
        model = streamed_model(config, store)
    except StudioError as exc:
        raise StudioError(f"The export does not match its model: {exc}") from None
    install_input_quantization(model, decoder.quant_config)
    equal, detail = tokenizer_files_equal(source, folder)
    yield Progress(1, 1, "Re-opened the compressed-tensors checkpoint")
    # every weight the file holds (a de-quantized embedding as stored), read when compared
    names = [key.rpartition(".")[0] for key in [*store.entries, *store.decoded]
             if key.endswith(".weight")]
    weights = _Lookup(lambda name: store.read(f"{name}.weight"), names)
    return Reloaded(model=model, tokenizer_equal=equal, tokenizer_detail=detail,
                    weights=weights, floats=_ModelFloats(model))


class _ModelFloats(Mapping):
    """A streamed model's float tensors by state-dict key, unread (meta, with their store)."""

    def __init__(self, model) -> None:
        self._state = model.state_dict(keep_vars=True)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._state[key]   # a StoredParameter: the comparison reads it a chunk at a time

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


# --- a plain checkpoint -----------------------------------------------------------------------

def checkpoint_job(folder: Path, source: Path) -> Job[Reloaded]:
    """The plain checkpoint in `folder` as a streamed model of its own config (the shards
    checked against their index first, as any streamed open does)."""
    from transformers import AutoConfig

    from studio.core.export.hf_folder import tokenizer_files_equal
    from studio.core.layers import get_module, is_conv1d
    from studio.core.streaming import StoredParameter, streamed_model

    yield Progress(0, 1, "Re-opening the checkpoint a layer at a time")
    try:
        model = streamed_model(AutoConfig.from_pretrained(folder, trust_remote_code=False),
                               WeightStore(folder))
    except (StudioError, OSError, ValueError) as exc:
        raise StudioError(f"The exported checkpoint does not open: {exc}") from None

    def weight(name: str) -> torch.Tensor:   # in the studio's [out, in] layout
        module = get_module(model, name)
        value = module.weight.read()
        return value.t() if is_conv1d(module) else value

    names = [name for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), StoredParameter)]
    equal, detail = tokenizer_files_equal(source, folder)
    yield Progress(1, 1, "Re-opened the checkpoint")
    return Reloaded(model=model, tokenizer_equal=equal, tokenizer_detail=detail,
                    weights=_Lookup(weight, names), floats=_ModelFloats(model))


# --- GGUF ------------------------------------------------------------------------------------

def gguf_job(file: Path, entries: list, shared: dict[str, str] | None = None
             ) -> Job[Reloaded]:
    """A GGUF export read tensor by tensor (gguf-py's de-quantization), under the base
    model's names and layout (`entries`: the writer's `gguf_tensors.Entry`s; `shared`: the
    variant's tied layers, {layer: the layer whose codes it holds}, one tensor in the file
    for both); logits from llama.cpp. `file` is the export's first (or only) file: a split GGUF's tensors are read
    from each of its files (`gguf_split.files`), as llama.cpp reads them. Each tensor is read
    from its file at its offset, not through the reader's memory map: a mapped page once
    touched counts in the process until the map goes."""
    from gguf import GGUFReader

    from studio.core.export import gguf_split, llama_cpp

    if not llama_cpp.available():
        raise StudioError(needs_llama_cpp())
    yield Progress(0, 1, "Opening the GGUF's tensor table")
    tensors = {t.name: (path, t) for path in gguf_split.files(file)
               for t in GGUFReader(str(path)).tensors}
    by_key = {entry.key: entry for entry in entries
              if entry.key is not None and entry.name in tensors}

    def read(key: str) -> torch.Tensor:
        return _base_layout(*tensors[by_key[key].name], by_key[key])

    layers = {e.layer: key for key, e in by_key.items() if e.layer is not None}
    for follower, leader in (shared or {}).items():   # a tied pair: token_embd holds both
        for one, other in ((follower, leader), (leader, follower)):
            if one in layers and other not in layers:
                layers[other] = layers[one]
    yield Progress(1, 1, "Opened the GGUF")
    return Reloaded(model=None, tokenizer_equal=None,
                    weights=_Lookup(lambda name: read(layers[name]), list(layers)),
                    floats=_Lookup(read, [k for k, e in by_key.items() if e.layer is None]),
                    logits=functools.partial(llama_cpp.logits, file), logits_by="llama.cpp",
                    extra={"perplexity_job": functools.partial(llama_cpp.perplexity_job,
                                                               file)})


def _base_layout(file: Path, tensor, entry) -> torch.Tensor:
    """A GGUF tensor (of `file`) de-quantized to float32 in the base model's layout."""
    from gguf.quants import dequantize

    raw = np.fromfile(file, dtype=np.uint8, count=int(tensor.n_bytes),
                      offset=int(tensor.data_offset))
    if raw.size != int(tensor.n_bytes):
        raise StudioError(f"{Path(file).name} ends inside {tensor.name}.")
    data = raw.view(tensor.data.dtype).reshape(tensor.data.shape)
    if tensor.tensor_type.name in ("F16", "F32"):   # as stored (the comparison widens it)
        values = torch.from_numpy(data)
    else:
        values = torch.from_numpy(np.ascontiguousarray(
            dequantize(data, tensor.tensor_type), dtype=np.float32))
    if entry.heads:   # undo llama's q/k row permutation (gguf_pack.llama_row_order)
        from studio.core.export.gguf_pack import llama_row_order

        order = llama_row_order(values.shape[0], entry.heads)
        values = values[torch.from_numpy(np.argsort(order))]
    if entry.plus_one:
        values = values.float() - 1.0
    return values


def needs_llama_cpp() -> str:
    return ("This variant streams from its files, and the GGUF written from it is verified "
            "the streamed way: each tensor against the variant's, and its logits in "
            "llama.cpp (re-opening it whole through transformers would hold the model in "
            "float32). Install the binding: pip install 'compression-studio[llama-cpp]'.")
