"""A quantized variant of a base model: its integer codes, and a model that runs on them.

`model` is what evaluation runs: it shares every unchanged tensor with the base model, and its
quantized layers are `CodedLinear`s computing with scale * (code - zero) (SmoothQuant's
simulated activation quantization installed as hooks). `qtensors` are the codes, scales and
zeros those layers, exporters and low-bit kernels use. A variant thus costs its codes and the
float tensors its method changed, not another float model. The base model is never altered.

A VARIANT folder (written by `save_variant`, read by `load_variant`):
    recipe.json          the plan (a recipe any model of the same architecture can take)
    variant.json         name, base source and architecture, calibration, timings, per-layer
                         specs and errors, activation bits
    quantized.safetensors  per layer, the tensors of its code format (`quant.formats`):
                         affine "<layer>.qweight" int32 packed codes, "<layer>.scale",
                         "<layer>.zero" (float32 [out, groups]); codebook "<layer>.indices",
                         ".table" (".scale"); vector "<layer>.indices", ".tables" (".scale").
                         variant.json names a layer's format when it is not affine
    codes-NNNNN.safetensors  instead, for a variant of a streamed model: one file per block,
                         written as the block was made (`variant_stream`); variant.json names
                         each layer's file
    floats.safetensors   float tensors the method changed besides quantized weights (norms and
                         biases after AWQ / SmoothQuant folding)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.files import atomic_dir, read_json
from studio.core.layers import get_module, is_linear, replace_module, weight_matrix
from studio.core.plan import Plan, QuantSpec
from studio.core.quant import formats
from studio.core.quant.coded import coded_layer
from studio.core.quant.grid import QTensor, storage_bits_per_weight

VARIANT_FORMAT = "compression-studio-variant"
VARIANT_VERSION = 1


def stored_bits(spec, qt) -> float:
    """Bits one quantized layer stores. The affine grid at the spec's price
    (`grid.storage_bits_per_weight`: GGUF-native specs at their type's bytes); other formats
    count their own tensors, tables included: a vector format's tables depend on the layer's
    rows as well as its width (GPTVQ), which a price per (spec, width) cannot know."""
    if getattr(qt, "format", "affine") != "affine":
        return float(qt.storage_bits())
    return storage_bits_per_weight(spec, qt.shape[1]) * qt.numel()


@dataclass
class Variant:
    name: str
    base_source: str
    architecture: str
    plan: Plan
    model: nn.Module
    qtensors: dict[str, QTensor]                  # coded tensors, of any `quant.formats` format
    specs: dict[str, QuantSpec]                   # layer -> the spec it was quantized with
    act_bits: dict[str, int] = field(default_factory=dict)
    calibration: str | None = None                # label of the calibration text (None: none)
    seconds: float = 0.0
    layer_errors: list[dict] = field(default_factory=list)
    floats: dict[str, torch.Tensor] = field(default_factory=dict)  # changed float tensors
    created: float = field(default_factory=time.time)

    @property
    def methods(self) -> list[str]:
        return sorted({spec.method for spec in self.specs.values()})

    @property
    def unique_qtensors(self) -> dict[str, QTensor]:
        """`qtensors` with a tied embedding left out where it holds its lm_head's very codes
        (one matrix stored once)."""
        seen: set[int] = set()
        unique = {}
        aliases = getattr(self.qtensors, "aliases", {})   # (codes kept in files: named)
        if hasattr(self.qtensors, "lazy"):
            # codes kept in files: their StoredCodes (shape and format known, values read
            # only if asked), not every layer decoded at once (~3 GiB for a 3B model)
            return {name: self.qtensors.lazy(name) for name in self.qtensors
                    if name not in aliases}
        for name, qt in self.qtensors.items():
            if name not in aliases and id(qt) not in seen:
                seen.add(id(qt))
                unique[name] = qt
        return unique

    @property
    def shared(self) -> dict[str, str]:
        """{layer: the layer whose codes it holds} for tied layers quantized once."""
        if hasattr(self.qtensors, "aliases"):   # codes kept in files (a streamed model's)
            return self.qtensors.aliases
        unique = self.unique_qtensors
        owner = {id(qt): name for name, qt in unique.items()}
        return {name: owner[id(qt)] for name, qt in self.qtensors.items() if name not in unique}

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight of the body: the block linears and any other layer
        quantized besides the embedding / lm_head (scales and zero points counted, GGUF-native
        layers at their GGUF type's bytes: `grid.storage_bits_per_weight`; layers left in full
        precision count 16). `model_bits_per_weight` is the whole model's."""
        total_bits = total = 0.0
        ends = self.end_layers
        for name, module in self.model.named_modules():
            if name in ends:
                continue
            if name in self.qtensors:
                qt = self.qtensors[name]
                total_bits += stored_bits(self.specs[name], qt)
                total += qt.numel()
            elif is_linear(module) and _in_block(name):
                total_bits += 16.0 * module.weight.numel()
                total += module.weight.numel()
        return total_bits / total if total else 16.0

    @property
    def end_layers(self) -> set[str]:
        """Names of the input embedding and the lm_head."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return {names[id(m)] for m in (getattr(self.model, g, lambda: None)() for g in (
            "get_input_embeddings", "get_output_embeddings")) if id(m) in names}

    @property
    def size_bytes(self) -> int:
        """Storage as a GGUF export writes it: quantized layers at their storage price
        (`grid.storage_bits_per_weight`), every other stored tensor (shared ones once) in
        16-bit floats, vectors in 32 (`float_bytes`); the sum of `size_breakdown`."""
        return sum(self.size_breakdown.values())

    @property
    def model_bits_per_weight(self) -> float:
        """8 x `size_bytes` over every weight the size counts (embedding, head, norms too): the
        figure a GGUF's size gives, where `bits_per_weight` is the quantized layers' average."""
        count = sum(qt.numel() for qt in self.unique_qtensors.values())
        count += sum(t.numel() for t in stored_floats(self.model))
        return 8 * self.size_bytes / count if count else 16.0

    @property
    def size_breakdown(self) -> dict[str, int]:
        """`size_bytes` split three ways (they add up to it): the quantized block layers
        (codes, scales, zeros), the embedding and lm_head (one matrix when tied; codes when
        quantized, else 16-bit: on a large-vocabulary model often the biggest part), and every
        other stored float tensor (norms and biases in 32 bits, layers kept in full precision
        in 16)."""
        end_layers, end_weights = self.end_layers, set()
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(self.model, getter, lambda: None)()
            if module is not None:
                weight = module._parameters.get("weight")
                if weight is not None:   # (a quantized one holds codes, no weight parameter)
                    end_weights.add(id(weight))
        quantized = embedding = 0.0
        for name, qt in self.unique_qtensors.items():
            cost = stored_bits(self.specs[name], qt) / 8
            if name in end_layers:
                embedding += cost
            else:
                quantized += cost
        other = 0
        for tensor in stored_floats(self.model):
            if id(tensor) in end_weights:
                embedding += float_bytes(tensor)
            else:
                other += float_bytes(tensor)
        return {"quantized": int(quantized), "embedding": int(embedding), "float": other}

    def to_summary(self) -> dict[str, Any]:
        errors = [e["error"] for e in self.layer_errors if e.get("error") is not None]
        rtn = [e["rtn_error"] for e in self.layer_errors if e.get("rtn_error") is not None]
        return {
            "name": self.name, "base": self.base_source, "architecture": self.architecture,
            "methods": self.methods, "calibration": self.calibration,
            "seconds": round(self.seconds, 3), "bits_per_weight": round(self.bits_per_weight, 4),
            "size_bytes": self.size_bytes, "size_mb": round(self.size_bytes / 2 ** 20, 3),
            "size_breakdown": self.size_breakdown,
            "model_bits_per_weight": round(self.model_bits_per_weight, 4),
            "layers": len(self.qtensors), "shared": self.shared,
            "act_bits": sorted(set(self.act_bits.values())),
            "mean_layer_error": sum(errors) / len(errors) if errors else None,
            "mean_rtn_error": sum(rtn) / len(rtn) if rtn else None,
        }


def planned_breakdown(model: nn.Module, specs: dict[str, QuantSpec]) -> dict[str, int]:
    """`Variant.size_breakdown` of `model` with the layers of `specs` quantized at their
    specs, counted without quantizing anything (the affine grid's price; a tied head's matrix
    once): what the benchmark's on-the-fly int8 / int4 models, and a float model ({}), weigh
    as an export stores them."""
    ends = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and module._parameters.get("weight") is not None:
            ends.add(id(module.weight))
    parts = {"quantized": 0.0, "embedding": 0.0, "float": 0}
    coded = set()
    for name, spec in specs.items():
        module = get_module(model, name)
        if id(module.weight) in coded:   # a tied pair named twice: one matrix
            continue
        coded.add(id(module.weight))
        w = weight_matrix(module)
        cost = storage_bits_per_weight(spec, w.shape[1]) * w.numel() / 8
        parts["embedding" if id(module.weight) in ends else "quantized"] += cost
    for tensor in stored_floats(model):
        if id(tensor) not in coded:
            parts["embedding" if id(tensor) in ends else "float"] += float_bytes(tensor)
    return {key: int(value) for key, value in parts.items()}


def stored_floats(model: nn.Module) -> list[torch.Tensor]:
    """The float tensors a file of the model holds: parameters and persistent buffers, a
    shared (tied) tensor once; rotary tables and other non-persistent buffers are rebuilt by
    every loader, so they are not stored."""
    seen: set[int] = set()
    tensors = []
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        items = [*module._parameters.items(),
                 *((k, b) for k, b in module._buffers.items() if k not in skip)]
        for _, tensor in items:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


def float_bytes(tensor: torch.Tensor) -> int:
    """A float tensor's stored bytes: matrices in 16 bits, vectors (norms, biases) in 32, as
    GGUF files and llama.cpp keep them."""
    return tensor.numel() * (4 if tensor.dim() < 2 else 2)


def _in_block(name: str) -> bool:
    return any(part.isdigit() for part in name.split("."))


# --- VARIANT folders -----------------------------------------------------------------------

def save_variant(variant: Variant, folder: str | Path) -> Path:
    """Write `variant` as a VARIANT folder, atomically (a half-written folder never appears)."""
    from studio.core.export.safetensors_stream import save as save_file
    from studio.core.variant_stream import CodeStore

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    shared = variant.shared
    stored = isinstance(variant.qtensors, CodeStore)   # a streamed model's: in block files
    if stored:
        variant.qtensors.flush()
        layers = {name: {"spec": variant.specs[name].to_dict(), **variant.qtensors.info(name)}
                  for name in variant.qtensors}
    for name, qt in ({} if stored else variant.qtensors).items():
        state, info = qt.to_state()
        if name not in shared:   # a tied embedding's codes are its lm_head's: written once
            tensors.update({f"{name}.{key}": value for key, value in state.items()})
        layers[name] = {"spec": variant.specs[name].to_dict(), **info, "shape": list(qt.shape)}
        if name in shared:
            layers[name]["codes_of"] = shared[name]
        if qt.format != "affine":  # left out for the affine grid: older studios read those
            layers[name]["format"] = qt.format
    meta = {
        "format": VARIANT_FORMAT, "version": VARIANT_VERSION, "name": variant.name,
        "base_source": variant.base_source, "architecture": variant.architecture,
        "calibration": variant.calibration, "seconds": variant.seconds,
        "created": variant.created, "act_bits": variant.act_bits,
        "layers": layers,
        "layer_errors": variant.layer_errors,
        "summary": variant.to_summary(),
    }
    with atomic_dir(folder) as tmp:
        (tmp / "recipe.json").write_text(json.dumps(variant.plan.to_json(), indent=2))
        (tmp / "variant.json").write_text(json.dumps(meta, indent=2))
        if stored:
            variant.qtensors.copy_into(tmp)
        else:
            save_file(tensors, str(tmp / "quantized.safetensors"))
        save_file({k: v.contiguous() for k, v in variant.floats.items()},
                  str(tmp / "floats.safetensors"))
        for path in [tmp, *tmp.iterdir()]:  # temporary files are private; the result is not
            path.chmod(0o755 if path.is_dir() else 0o644)
    read_variant_meta(folder)  # re-open what was written
    return folder


def read_variant_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    meta = read_json(folder / "variant.json",
                     f"{folder} is not a variant folder (it has no variant.json).")
    if not isinstance(meta, dict) or meta.get("format") != VARIANT_FORMAT:
        raise StudioError(f"{folder} is not a Compression Studio variant.")
    if meta.get("version") != VARIANT_VERSION:
        raise StudioError(f"Variant version {meta.get('version')!r} is not supported "
                          f"(this studio reads version {VARIANT_VERSION}).")
    check_meta(meta, folder)
    return meta


def check_meta(meta: dict, folder: Path) -> None:
    """variant.json's fields have the types and ranges the loader relies on (a variant folder may
    come from anywhere; a wrong type would otherwise fail deep inside the load)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise StudioError(f"{folder / 'variant.json'} is not a valid variant: {what}.")

    for key in ("name", "base_source", "architecture"):
        need(isinstance(meta.get(key), str), f"{key} is not a name")
    need(isinstance(meta.get("calibration"), (str, type(None))), "calibration is not a label")
    for key in ("seconds", "created"):
        value = meta.get(key, 0)
        need(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} is not a number")
    act_bits = meta.get("act_bits", {})
    need(isinstance(act_bits, dict) and all(
        isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 for v in act_bits.values()),
        "act_bits are not layer -> 2..16 bits")
    errors = meta.get("layer_errors", [])
    need(isinstance(errors, list) and all(isinstance(e, dict) for e in errors),
         "layer_errors is not a list of records")
    layers = meta.get("layers")
    need(isinstance(layers, dict), "layers is not an object")
    for name, info in layers.items():
        need(isinstance(info, dict), f"layer {name} is not an object")
        bits, group, shape = info.get("bits"), info.get("group_size"), info.get("shape")
        need(isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8,
             f"layer {name} has {bits!r} bits")
        need(isinstance(shape, list) and len(shape) == 2 and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape),
            f"layer {name} has shape {shape!r}")
        need(info.get("format", "affine") in formats.FORMATS,
             f"layer {name} has the unknown code format {info.get('format')!r}")
        if info.get("format", "affine") != "vector":
            need(isinstance(group, int) and not isinstance(group, bool) and 0 < group <= shape[1],
                 f"layer {name} has group size {group!r}")
        need(isinstance(info.get("spec"), dict), f"layer {name} has no spec")
        leader = info.get("codes_of")
        need(leader is None or (isinstance(leader, str) and leader != name and isinstance(
            layers.get(leader), dict) and "codes_of" not in layers[leader]),
             f"layer {name} holds the codes of {leader!r}, which is not a layer with codes")
        file = info.get("file", "quantized.safetensors")   # block files: a streamed model's
        need(isinstance(file, str) and file == Path(file).name and not file.startswith(".")
             and file.endswith(".safetensors"), f"layer {name} names the file {file!r}")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of the variant, its header checked against its size first."""
    from safetensors.torch import load_file

    from studio.core.file_checks import safetensors_header

    if not file.is_file():
        raise StudioError(f"{file.parent} is not a complete variant: {file.name} is missing.")
    safetensors_header(file)
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors' own refusal of a file its header check let by
        raise StudioError(f"{file} could not be read: {exc}") from None


def is_variant_folder(path: str | Path) -> bool:
    return (Path(path) / "variant.json").is_file()


def load_variant(folder: str | Path, base_handle=None) -> Variant:
    """Rebuild a variant from its folder and the base model (re-opened from its recorded
    source when no handle is given)."""
    import copy

    folder = Path(folder)
    meta = read_variant_meta(folder)
    plan = Plan.load(folder / "recipe.json")
    specs_read = {name: QuantSpec.from_dict(info["spec"]) for name, info in meta["layers"].items()}
    if base_handle is None:
        from studio.core.jobs import run
        from studio.core.models import open_model_job
        base_handle = run(open_model_job(meta["base_source"]))
    if base_handle.architecture != meta["architecture"]:
        raise StudioError(f"This variant was made from a {meta['architecture']}, but the base "
                          f"model given is a {base_handle.architecture}.")
    # Shares the base model's tensors; the changed floats and the quantized layers replace
    # them (nothing is written into a shared tensor).
    base_tensors = (*base_handle.model.parameters(), *base_handle.model.buffers())
    model = copy.deepcopy(base_handle.model, {id(t): t for t in base_tensors})
    from studio.core.streaming import streams
    from studio.core.variant_stream import CodeStore, read_all

    floats = _load_tensors(folder / "floats.safetensors")
    # A streamed base model gets its codes read as each layer runs, in memory all at once else
    codes = CodeStore.open(folder, meta["layers"]) if streams(base_handle.model) else None
    by_layer = {} if codes is not None else read_all(folder, meta["layers"])
    # a tied pair quantized once stays tied (both sides become coded layers of one QTensor)
    tied_once = {n for i in meta["layers"].values() for n in (i.get("codes_of"),)} - {None}
    tied_once |= {n for n, i in meta["layers"].items() if i.get("codes_of")}
    untie_if_needed(model, [n for n in meta["layers"] if n not in tied_once])
    owners = {f"{prefix}.{key}" if prefix else key: (module, key)
              for prefix, module in model.named_modules()
              for key in (*module._parameters, *module._buffers)}
    for key, value in floats.items():
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise StudioError(f"The variant's {key} is {value.dtype}, not a float tensor.")
        if key not in owners:
            raise StudioError(f"The variant changes {key}, which the base model does not have.")
        module, attr = owners[key]
        old = getattr(module, attr)
        if old.shape != value.shape:
            raise StudioError(f"The variant's {key} is {list(value.shape)}; the base model's "
                              f"is {list(old.shape)}.")
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value.to(old.dtype), requires_grad=False)
        else:
            module._buffers[attr] = value.to(old.dtype)
    qtensors, specs = {}, {}
    for name, info in sorted(meta["layers"].items(), key=lambda item: "codes_of" in item[1]):
        out, cols = info["shape"]
        leader = info.get("codes_of")
        if leader is not None:   # a tied embedding holding its lm_head's codes
            if leader not in qtensors or tuple(qtensors[leader].shape) != (out, cols):
                raise StudioError(f"The variant's {name} holds the codes of {leader}, which it "
                                  f"does not quantize at that shape.")
            replace_module(model, name, coded_layer(get_module(model, name), qtensors[leader]))
            qtensors[name], specs[name] = qtensors[leader], specs_read[name]
            continue
        if codes is None and name not in by_layer:
            raise StudioError(f"The variant's {name} is missing from "
                              f"{info.get('file', 'quantized.safetensors')}.")
        try:
            module = get_module(model, name)
        except AttributeError:
            raise StudioError(f"The variant quantizes {name}, which the base model does not "
                              f"have.") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise StudioError(f"The variant quantizes {name}, which is not a weight layer.")
        if tuple(weight_matrix(module).shape) != (out, cols):
            raise StudioError(f"The variant's {name} is {[out, cols]}; the base model's is "
                              f"{list(weight_matrix(module).shape)}.")
        fmt = formats.get(info.get("format", "affine"))
        if codes is not None:
            qt = codes.lazy(name)
        else:
            try:
                qt = fmt.tensor_class().from_state(by_layer[name], info, (out, cols))
            except StudioError as exc:
                raise StudioError(f"The variant's {name} ({fmt.name} codes): {exc}.") from None
        replace_module(model, name, coded_layer(module, qt))
        qtensors[name] = qt
        specs[name] = specs_read[name]
    if codes is not None:
        qtensors = codes
    act_bits = {k: int(v) for k, v in meta.get("act_bits", {}).items()}
    unknown = sorted(set(act_bits) - set(qtensors))
    if unknown:
        raise StudioError(f"The variant quantizes the inputs of {unknown[0]}, which it does not "
                          f"quantize.")
    if act_bits:
        from studio.core.quant.smoothquant import install_act_quant
        install_act_quant(model, act_bits)
    return Variant(name=meta["name"], base_source=meta["base_source"],
                   architecture=meta["architecture"], plan=plan, model=model,
                   qtensors=qtensors, specs=specs, act_bits=act_bits,
                   calibration=meta.get("calibration"), seconds=float(meta.get("seconds", 0)),
                   layer_errors=list(meta.get("layer_errors", [])), floats=floats,
                   created=float(meta.get("created", time.time())))


def untie_if_needed(model: nn.Module, quantized: dict | list) -> None:
    """Give a tied lm_head its own Parameter when it or the embedding is quantized, so quantizing
    one never silently changes the other. It shares the embedding's storage until it is
    replaced (callers give a quantized layer a new tensor; nothing writes into this one)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or emb is None or out.weight is not emb.weight:
        return
    names = {id(m): n for n, m in model.named_modules()}
    if names.get(id(out)) in quantized or names.get(id(emb)) in quantized:
        from studio.core.streaming import StoredParameter

        weight = out.weight
        out.weight = StoredParameter(weight.store, weight.key) if isinstance(
            weight, StoredParameter) else nn.Parameter(weight.detach(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
