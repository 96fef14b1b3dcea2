"""Which tensors a GGUF export holds, in which type, and where each comes from.

Quantized layers take the GGUF type that holds their codes exactly (gguf_types.exact_type,
checked against the layer's own zero points); a layer no type holds takes the nearest one the user
allows (Q8_0 re-rounded from the de-quantized weights, or a float type when its rows are not
whole 32-weight blocks). Other tensors are floats: 1-D (norms, biases) in F32 as llama.cpp's
converter writes them, 2-D in the float type the user chose.

Names follow gguf-py's tensor map (what transformers' GGUF loader reverses). Two architecture
quirks the loader undoes, so the writer must apply them: llama's q/k rows are permuted
(rotate-half -> interleaved, K by its own KV head count), Gemma 2/3 norms are stored as w + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from studio.core import metrics
from studio.core.export import gguf_pack
from studio.core.export.base import ExportOptions, LayerTarget
from studio.core.export.gguf_meta import NORM_PLUS_ONE_ARCHS, PERMUTED_ARCHS
from studio.core.export.gguf_types import TYPES, exact_type
from studio.core.export.tensors import float_tensors

FLOAT_TYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


# --- quantized layers ------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    stored_as: str      # the GGUF type name
    how: str            # "codes" (packed by hand), "q8_0" (re-rounded) or "float"
    case: str = ""      # why the codes could not be kept (the nearest-type cases)


def is_symmetric(qt) -> bool:
    """Symmetric codes have their zero in the middle of the range everywhere."""
    return bool(torch.all(qt.zero == 2 ** (qt.bits - 1)))


def choose(qt, options: ExportOptions) -> Choice:
    """How one quantized layer goes into the file (the same answer in preflight and write)."""
    cols = qt.shape[1]
    if not gguf_pack.blocks_fit(qt):
        kind = "F32" if options.dtype == "f32" else "F16"
        why = (f"rows of {cols} weights are not whole 32-weight blocks" if cols % 32 else
               f"groups of {qt.group_size} cut 32-weight blocks")
        return Choice(kind, "float", why)
    gtype = exact_type(qt.bits, is_symmetric(qt), options.gguf_asym4)
    if gtype is None:
        return Choice("Q8_0", "q8_0", f"{qt.bits}-bit asymmetric codes fit no GGUF type")
    if not gguf_pack.codes_fit(qt, gtype):
        return Choice("Q8_0", "q8_0", f"codes or zero points fall outside {gtype.name}'s range")
    return Choice(gtype.name, "codes")


def stored_weights(qt, choice: Choice) -> torch.Tensor:
    """What the file will give back for this layer (float32 [out, in]).

    For the offset types (Q4_0, Q5_0, Q8_0) that is d * (q - offset) = fp16(s) * (u - z): one
    float32 product, the same as the studio's de-quantization with the scales rounded to fp16
    (the tests check it against gguf's own de-quantization of the packed bytes), so it is
    computed without packing. Q4_1 adds an fp16 offset (two roundings) and Q8_0 re-rounding
    changes the codes: those go through the bytes themselves."""
    from studio.core.quant.grid import dequantize

    if choice.how == "codes" and not TYPES[choice.stored_as].affine:
        return dequantize(qt.codes, qt.scale.half().float(), qt.zero, qt.group_size)
    if choice.how == "codes":
        return gguf_pack.dequantize(gguf_pack.pack(qt, TYPES[choice.stored_as]), choice.stored_as)
    w = qt.dequantize()
    if choice.how == "q8_0":
        return gguf_pack.dequantize(gguf_pack.requantize_q8_0(w), "Q8_0")
    return w.to(torch.float16).float() if choice.stored_as == "F16" else w


def layer_target(name: str, qt, choice: Choice) -> LayerTarget:
    """The preflight's line for one layer; the error is measured on what will be written."""
    fp16_scales = gguf_pack.scales_are_fp16(qt)
    if choice.how == "codes" and fp16_scales and not TYPES[choice.stored_as].affine:
        return LayerTarget(name, choice.stored_as, exact=True)   # d = s, q = u - z + offset
    if choice.how == "codes":
        why = [] if fp16_scales else ["scales rounded once to fp16 (GGUF's d); the GGUF-native "
                                      "plan option quantizes with fp16 scales and avoids it"]
        if TYPES[choice.stored_as].affine:
            why.append("Q4_1 stores the offset -d*z as an fp16 value (Q5_0 holds these codes "
                       "exactly)")
        note = "; ".join(why)
    elif choice.how == "q8_0":
        note = f"{choice.case}: re-rounded to Q8_0 from the de-quantized weights"
    else:
        note = f"{choice.case}: written de-quantized as {choice.stored_as}"
    expected = qt.dequantize()
    got = stored_weights(qt, choice)
    if torch.equal(got, expected):
        return LayerTarget(name, choice.stored_as, exact=True, note=note)
    error = metrics.relative_error(expected, got)
    return LayerTarget(name, choice.stored_as, exact=False, error=error, note=note)


def refusals(targets: list[LayerTarget], choices: dict[str, Choice]) -> list[str]:
    """One sentence per case of layers no GGUF type holds exactly (for the 'refuse' policy)."""
    by_case: dict[str, list[LayerTarget]] = {}
    for target in targets:
        choice = choices[target.name]
        if choice.how != "codes" and not target.exact:
            by_case.setdefault(choice.case, []).append(target)
    sentences = []
    for case, hit in by_case.items():
        names = ", ".join(t.name for t in hit[:6]) + (f" and {len(hit) - 6} more"
                                                        if len(hit) > 6 else "")
        worst = max(t.error or 0.0 for t in hit)
        kinds = "/".join(sorted({t.stored_as for t in hit}))
        sentences.append(f"{case[0].upper()}{case[1:]} in {names}; the nearest type is {kinds} "
                         f"(measured relative error up to {worst:.2g}): allow the nearest type, "
                         f"or re-plan these layers.")
    return sentences


# --- every tensor of the file ----------------------------------------------------------------

@dataclass
class Entry:
    name: str                   # GGUF tensor name
    key: str | None             # the variant's state-dict key (None: copied from the source)
    layer: str | None = None    # the quantized layer whose weights these are
    heads: int | None = None    # llama's q/k row permutation with this many heads
    plus_one: bool = False      # Gemma norms are stored as w + 1


def gguf_arch_enum(arch: str):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def variant_keys(variant, handle) -> list[str]:
    """State-dict keys the file holds, in the base checkpoint's order: every float tensor and
    every quantized weight; a tied, unquantized lm_head only once (as the embedding)."""
    model = variant.model
    wanted = set(float_tensors(variant, lazy=True)) | {f"{n}.weight" for n in variant.qtensors}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    if out is not None and names.get(id(out)) not in variant.qtensors:
        emb = model.get_input_embeddings()
        if out.weight is emb.weight:
            wanted.discard(f"{names[id(out)]}.weight")
    if out is not None and names.get(id(out)) in variant.shared.values():
        # a tied pair quantized once: token_embd holds it, and with no output.weight
        # llama.cpp and transformers' loader use it as the head too
        wanted.discard(f"{names[id(out)]}.weight")
    keys = [k for k in handle.model.state_dict() if k in wanted]
    keys += sorted(wanted - set(keys))
    return [k for k in keys if not k.endswith("inv_freq")]   # rotary tables: rebuilt by loaders


def map_names(variant, handle, arch: str) -> tuple[dict[str, Entry], list[str]]:
    """GGUF name -> Entry for every key of the variant, and the keys with no GGUF name."""
    import gguf

    config = variant.model.config
    name_map = gguf.get_tensor_name_map(gguf_arch_enum(arch), config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    entries, unmapped = {}, []
    for key in variant_keys(variant, handle):
        module, _, suffix = key.rpartition(".")
        base = name_map.get_name(module)
        if base is None:
            unmapped.append(key)
            continue
        name = f"{base}.{suffix}"
        if name in entries:
            unmapped.append(f"{key} (it would take {entries[name].key}'s name, {name})")
            continue
        role = base.rsplit(".", 1)[-1]
        entries[name] = Entry(
            name, key, layer=module if module in variant.qtensors and suffix == "weight" else None,
            heads=heads.get(role) if arch in PERMUTED_ARCHS else None,
            plus_one=arch in NORM_PLUS_ONE_ARCHS and "norm.weight" in name)
    return entries, unmapped


def ordered_entries(mapped: dict[str, Entry], source=None) -> list[Entry]:
    """Entries in the file's order. With `source` (a GGUFReader of the source GGUF): its own
    order and names (its tensors the model does not use, e.g. rope_freqs, copied as they are),
    then anything new (an lm_head the variant untied and quantized). Without: the
    checkpoint's order."""
    if source is None:
        return list(mapped.values())
    left = dict(mapped)
    entries = [left.pop(t.name, Entry(t.name, None)) for t in source.tensors]
    return entries + list(left.values())


def float_type(value: torch.Tensor, options: ExportOptions) -> str:
    return "F32" if value.dim() < 2 else FLOAT_TYPES[options.dtype]


def float_bytes(value: torch.Tensor, kind: str) -> np.ndarray:
    """A float tensor as the GGUF type's array: F32/F16 numpy, BF16 as uint8 bytes."""
    import gguf

    data = value.detach().float().contiguous().numpy()
    if kind == "F32":
        return data
    if kind == "F16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
