"""A variant's codes kept in files, one file per decoder block, read a layer at a time (issue 17).

A variant of a streamed model would otherwise hold every layer's codes until it is saved
(~1.5 GiB for a 3B model at W4 g128, beside the block being quantized). Instead the quantize
job writes each block's codes to a staging folder as soon as the block is done, and the
variant's model runs on `StoredCodes`, which read a layer's codes when the layer runs and let
them go after. Saving links (or copies) the block files into the VARIANT folder inside
`files.atomic_dir`, so the folder appears complete or not at all; loading a variant onto a
streamed model reads only the files' headers. In-memory models keep plain dicts of QTensors.

    codes = CodeStore.staging()           # during quantize (files under the cache folder)
    codes[name] = qt                      # pending, in memory
    codes.flush()                         # pending codes to codes-NNNNN.safetensors, dropped
    codes[name]                           # a QTensor read from its file (not kept)
    codes.lazy(name)                      # what a CodedLinear holds: reads on dequantize()

The store is a read-only Mapping for everyone but the quantize job: exporters and views that
iterate `variant.qtensors` get one layer's codes at a time.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from studio.core.errors import StudioError
from studio.core.quant import formats

SINGLE_FILE = "quantized.safetensors"   # the in-memory path's one file (and older variants')
STAGING = "variant-codes"               # under the cache folder


class CodeStore(Mapping):
    """layer name -> coded tensor, each layer's tensors in one of `folder`'s safetensors files."""

    def __init__(self, folder: Path, layers: dict[str, dict] | None = None) -> None:
        self.folder = Path(folder)
        self._layers: dict[str, dict] = dict(layers or {})   # written: info + shape + file
        self._pending: dict[str, object] = {}                 # made, not yet written
        self._aliases: dict[str, str] = {}   # a tied layer -> the layer whose codes it holds
        self._files = 0

    # --- making (the quantize job) ---------------------------------------------------------

    @classmethod
    def staging(cls, root: Path | None = None) -> "CodeStore":
        """An empty store in a new private folder, removed when the store is collected (or,
        after a crash, by the next staging store)."""
        if root is None:
            from studio.core.models import cache_root
            root = cache_root() / STAGING
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        store = cls(folder)
        weakref.finalize(store, shutil.rmtree, str(folder), True)
        return store

    def __setitem__(self, name: str, qt) -> None:
        self._layers.pop(name, None)
        self._pending[name] = qt

    def alias(self, follower: str, leader: str) -> None:
        """`follower` holds `leader`'s very codes (a tied embedding and its lm_head)."""
        self._aliases[follower] = leader

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def flush(self) -> None:
        """Write the pending codes to a new file of the folder and drop them from memory."""
        from studio.core.export.safetensors_stream import save as save_file

        if not self._pending:
            return
        file = f"codes-{self._files:05d}.safetensors"
        self._files += 1
        tensors, infos = {}, {}
        for name, qt in self._pending.items():
            state, info = qt.to_state()
            tensors.update({f"{name}.{key}": value.contiguous() for key, value in state.items()})
            infos[name] = {**info, "shape": list(qt.shape), "file": file}
            if qt.format != "affine":   # left out for the affine grid, as save_variant does
                infos[name]["format"] = qt.format
        partial = self.folder / f".{file}.partial"
        save_file(tensors, str(partial))
        os.replace(partial, self.folder / file)
        self._layers.update(infos)
        self._pending.clear()

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, layers: dict[str, dict]) -> "CodeStore":
        """The codes of a VARIANT folder, lazily: only the files' headers are read, to check
        that every layer's tensors are where variant.json says."""
        from studio.core.file_checks import safetensors_header

        aliases = {name: info["codes_of"] for name, info in layers.items()
                   if info.get("codes_of")}
        layers = {name: {**info, "file": info.get("file", SINGLE_FILE)}
                  for name, info in layers.items() if name not in aliases}
        held: dict[str, set[str]] = {}
        for file in sorted({info["file"] for info in layers.values()}):
            path = Path(folder) / file
            if not path.is_file():
                raise StudioError(f"{folder} is not a complete variant: {file} is missing.")
            held[file] = {key.rpartition(".")[0] for key in safetensors_header(path)
                          if key != "__metadata__"}
        for name, info in layers.items():
            if name not in held[info["file"]]:
                raise StudioError(f"The variant's {name} is missing from {info['file']}.")
        store = cls(folder, layers)
        store._aliases = aliases
        return store

    def __getitem__(self, name: str):
        name = self._aliases.get(name, name)
        if name in self._pending:
            return self._pending[name]
        info = self._layers[name]
        return _decode(name, info, read_layer(self.folder / info["file"], name))

    def __contains__(self, name) -> bool:
        return name in self._pending or name in self._layers or name in self._aliases

    def __iter__(self):
        yield from self._layers
        yield from self._pending
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._layers) + len(self._pending) + len(self._aliases)

    def shape(self, name: str) -> tuple[int, int]:
        name = self._aliases.get(name, name)
        if name in self._pending:
            return tuple(self._pending[name].shape)
        return tuple(self._layers[name]["shape"])

    def format(self, name: str) -> str:
        name = self._aliases.get(name, name)
        if name in self._pending:
            return self._pending[name].format
        return self._layers[name].get("format", "affine")

    def lazy(self, name: str) -> "StoredCodes":
        return StoredCodes(self, name)

    def __deepcopy__(self, memo) -> "CodeStore":
        return self   # one store per folder (its staging folder goes with the last holder)

    # --- saving ----------------------------------------------------------------------------

    def info(self, name: str) -> dict:
        """variant.json's entry for a written layer (its format's fields, shape, file; a tied
        layer's names the layer whose codes it holds)."""
        if name in self._aliases:
            return {**self._layers[self._aliases[name]], "codes_of": self._aliases[name]}
        return dict(self._layers[name])

    def copy_into(self, folder: Path) -> None:
        """Every file holding this store's codes into `folder`: a hard link where the file
        system allows (no bytes copied), else a copy, one file at a time."""
        self.flush()
        for file in sorted({info["file"] for info in self._layers.values()}):
            source, target = self.folder / file, Path(folder) / file
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)


class StoredCodes:
    """One layer's codes in its file: shape and format known, values read when asked for (the
    CodedLinear of a streamed variant de-quantizes from it as the layer runs)."""

    def __init__(self, store: CodeStore, name: str) -> None:
        self.store, self.name = store, name
        self.shape = store.shape(name)
        self.format = store.format(name)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def load(self):
        return self.store[self.name]

    def dequantize(self) -> torch.Tensor:
        return self.load().dequantize()

    def __getattr__(self, attr: str):
        # anything else a coded tensor has (bits, scale, storage_bits ...), from the file
        if attr.startswith("__") or attr in ("store", "name", "shape", "format"):
            raise AttributeError(attr)
        return getattr(self.load(), attr)

    def __deepcopy__(self, memo) -> "StoredCodes":
        return self   # the file never changes; copies of a model share it

    def __repr__(self) -> str:
        return f"StoredCodes({self.name}, {list(self.shape)}, {self.format})"


def stored_or_held(qtensors, name: str):
    """What a CodedLinear holds for `name`: the codes in memory, or a StoredCodes."""
    return qtensors.lazy(name) if isinstance(qtensors, CodeStore) else qtensors[name]


def read_layer(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of layer `name` in safetensors file `path` ({part: tensor}), nothing else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key.rpartition(".")[2]: handle.get_tensor(key) for key in handle.keys()
                    if key.rpartition(".")[0] == name}
    except Exception as exc:   # a file changed or cut since it was opened
        raise StudioError(f"{path} could not be read: {exc}") from None


def read_all(folder: Path, layers: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Every layer's tensors of a VARIANT folder in memory ({layer: {part: tensor}}), from its
    one file or its block files (an in-memory base model takes them all at once)."""
    from safetensors.torch import load_file

    from studio.core.file_checks import safetensors_header

    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted({info.get("file", SINGLE_FILE) for info in layers.values()}):
        path = Path(folder) / file
        if not path.is_file():
            raise StudioError(f"{folder} is not a complete variant: {file} is missing.")
        safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise StudioError(f"{path} could not be read: {exc}") from None
        for key, value in tensors.items():
            layer, _, part = key.rpartition(".")
            by_layer.setdefault(layer, {})[part] = value
    return by_layer


def _decode(name: str, info: dict, tensors: dict[str, torch.Tensor]):
    fmt = formats.get(info.get("format", "affine"))
    try:
        return fmt.tensor_class().from_state(tensors, info, tuple(info["shape"]))
    except StudioError as exc:
        raise StudioError(f"The variant's {name} ({fmt.name} codes): {exc}.") from None


def _remove_abandoned(root: Path) -> None:
    """Staging folders of processes that are gone (killed mid-quantize)."""
    import psutil

    for folder in root.iterdir():
        pid = folder.name.split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
