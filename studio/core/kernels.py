"""Run quantized layers on real low-bit CPU kernels instead of de-quantized floats.

Two kernels ship in this torch build, both taking bfloat16 activations (with float32 ones they
are many times slower):

* `aten._weight_int8pack_mm(x, w_int8 [out, in], scales [out])`: int8 weights, one scale per
  output channel, symmetric.
* `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [in/group, out, 2])`:
  int4 weights in groups of 32/64/128 that must divide the input width, de-quantized by the
  kernel as `(q - 8) * scale + zero`.

Our grid is `w = scale * (code - z)` with an integer zero point z per group, and it maps onto
both kernels exactly:
* int4: `scale * (q - z) = (q - 8) * scale + scale * (8 - z)`, so any code width up to 4 bits,
  symmetric or not, packs as is (codes of 3 bits or fewer are re-centred on 8 so the zero term
  vanishes: bf16 cannot hold scale * (8 - z) exactly). Groups the kernel cannot take are split into kernel groups that
  share the same scale: per-channel rows, and the demo's ragged g128 over 576 columns
  (4 x 128 + 64) run as g64 blocks.
* int8 (per-channel only): codes of up to 7 bits become `code - z` exactly; 8-bit codes become
  `code - 128` and a per-row term `scale * (z - 128) * sum(x)` restores asymmetric zero points.

Everything else (5-8 bits in groups, widths no kernel group divides, a layer with no codes)
falls back *visibly*: the layer runs as a de-quantized float32 matmul and the report says why.

Prefill (a call with at least `PREFILL_ROWS` token rows) does not use the low-bit kernels: they
de-quantize a tile of weights for every few rows and are no faster than a float32 matmul at 128
tokens. Instead the layer de-quantizes its weights once per call, straight from the kernel's
own packed buffer (no second copy of the codes), into `PREFILL_DTYPE` (bfloat16 where the CPU
multiplies it natively, else float32, which this AVX2 machine's BLAS runs faster than its
emulated bf16) and runs one dense GEMM; decode (one row) stays on the kernel. The de-quantized
weight lives only for that call. `kernel_model(prefill="kernel")` turns it off (benchmarks
compare both).

Only the kernels see bf16: a kernel model keeps the rest of the network (embeddings, norms,
attention, the residual stream) in float32 and each kernel module casts its input to bf16 and
its output back. Measured here, bf16 attention on CPU is ~7x slower than float32 for one
decode query (scaled_dot_product_attention: ~320 vs ~45 us per layer), and float32 also keeps
the residual stream exact.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from studio.core import q4_native
from studio.core.layers import move_pre_hooks, replace_module, weight_matrix
from studio.core.quant.coded import CodedEmbedding, CodedLinear
from studio.core.quant import formats
from studio.core.quant.grid import QTensor, expand_groups

log = logging.getLogger(__name__)

KERNEL_GROUPS = (128, 64, 32)
KERNEL_SETS = ("native", "torch")
INT4_TILES = 2  # inner k tiles for the CPU packing; the CPU kernel accepts any of 1, 2, 4, 8
# Calls with this many token rows or more take the dense prefill path. De-quantizing costs
# about what 20-30 rows cost on the int4 kernel (demo layers, this 2-core AVX2 machine, loaded:
# dense won from ~90 rows before the de-quantization was cut to a third), so short prompts stay
# on the kernel; `benchmarks/bench_speed.py` compares both paths at its prompt length.
PREFILL_ROWS = 32
PREFILL_MODES = ("dense", "kernel")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 / AMX), as oneDNN reports."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


PREFILL_DTYPE = torch.bfloat16 if native_bf16() else torch.float32


@functools.lru_cache(maxsize=None)
def int4_block_n() -> int | None:
    """How torch's CPU int4 packing lays out rows: packed [N, K/2] bytes are blocks of
    `BLOCK_N` rows, [N/BLOCK_N, K, BLOCK_N/2], byte j of a block holding row j in its low
    nibble and row j + BLOCK_N/2 in its high one. The block size depends on the CPU (32 with
    AVX2, 64 with AVX-512), so it is found by packing known codes once; None when no layout
    fits (the dense prefill path is then not used)."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_TILES)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (128, 32):
        return None
    for block in (64, 32, 16, 8):
        view = packed.reshape(128 // block, 64, block // 2).to(torch.int32)
        rows = torch.cat([view & 15, view >> 4], dim=-1).permute(0, 2, 1).reshape(128, 64)
        if torch.equal(rows, codes):
            return block
    return None


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs one layer, and why when it is a fallback."""
    layer: str
    kernel: str           # "int4pack g32", "int8pack", "bf16 dense", "fp32 dense" ...
    bits: int | None      # the layer's code width; None for a float layer
    weight_bytes: int     # bytes the kernel reads per token for this layer's weights
    note: str = ""        # why a fallback, or how the groups were mapped

    @property
    def fallback(self) -> bool:
        return "dense" in self.kernel and self.bits is not None

    def to_dict(self) -> dict:
        return {"layer": self.layer, "kernel": self.kernel, "bits": self.bits,
                "weight_bytes": self.weight_bytes, "note": self.note, "fallback": self.fallback}


# --- the kernel modules --------------------------------------------------------------------

class Int4Linear(nn.Module):
    """y = x @ W.T + b with W held as packed int4 groups (bf16 into the kernel, x's dtype out)."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                 in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("bias", bias)
        block = int4_block_n()
        self.block_n = block if block and out_features % block == 0 else None
        self.prefill_rows: int | None = PREFILL_ROWS if self.block_n else None

    def dequantized(self, dtype: torch.dtype = PREFILL_DTYPE) -> torch.Tensor:
        """W.T [in, out] in `dtype`, read from the kernel's packed buffer (see int4_block_n):
        code * scale + (zero - 8 * scale), the kernel's (code - 8) * scale + zero, in float32,
        rounded once to `dtype`. This runs on every prefill, so it makes few passes: nibbles
        converted straight into the float32 result, then one in-place multiply-add (a `cat`
        and a mixed-dtype addcmul each cost about as much again)."""
        k, n, block = self.in_features, self.out_features, self.block_n
        groups, half = k // self.group, block // 2
        packed = self.packed.view(n // block, k, half).transpose(0, 1)      # [K, N/B, B/2]
        weight = torch.empty(k, n // block, block)
        weight[..., :half].copy_(packed & 15)       # rows j of each block: low nibbles
        weight[..., half:].copy_(packed >> 4)       # rows j + B/2: high nibbles
        scale = self.scales_zeros[..., 0].float().view(groups, 1, n)
        offset = self.scales_zeros[..., 1].float().view(groups, 1, n) - 8 * scale
        grouped = weight.view(groups, self.group, n)
        torch.addcmul(offset, grouped, scale, out=grouped)
        return weight.view(k, n).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.prefill_rows is not None and flat.shape[0] >= self.prefill_rows:
            weight = self.dequantized()
            y = torch.mm(flat.to(weight.dtype), weight).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, self.group, self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W as int8 rows and one scale per row (bf16 into the kernel)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        # scale * (z - 128) per row, for 8-bit asymmetric codes; None when all zeros are 128.
        self.register_buffer("offset", offset)
        self.register_buffer("bias", bias)
        self.prefill_rows: int | None = PREFILL_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.prefill_rows is not None and flat.shape[0] >= self.prefill_rows:
            # Prefill: one de-quantized copy for this call, one dense GEMM (see the top).
            weight = (self.weight.to(PREFILL_DTYPE) * self.scales.to(PREFILL_DTYPE)[:, None])
            y = torch.nn.functional.linear(flat.to(PREFILL_DTYPE), weight).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
        if self.offset is not None:
            y = y - flat.to(x.dtype).sum(-1, keepdim=True) * self.offset.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


# --- building them from QTensors -----------------------------------------------------------

def int4_group(q: QTensor) -> int | None:
    """The kernel group size that reproduces q's groups exactly, or None when none does."""
    cols = q.shape[1]
    for group in KERNEL_GROUPS:
        if cols % group == 0 and q.group_size % group == 0:
            return group
    return None


def make_int4(q: QTensor, bias: torch.Tensor | None) -> tuple[Int4Linear, str]:
    out, cols = q.shape
    group = int4_group(q)
    assert group is not None and q.bits <= 4
    blocks = cols // group
    # Each of q's groups covers group_size // group kernel groups (the ragged last one fewer).
    scale = q.scale.float().repeat_interleave(q.group_size // group, dim=1)[:, :blocks]
    zero = q.zero.float().repeat_interleave(q.group_size // group, dim=1)[:, :blocks]
    codes = q.codes.to(torch.int32)
    if q.bits <= 3:
        # code - z + 8 still fits 0..15: the kernel's zero term becomes exactly 0 instead of a
        # bf16-rounded scale * (8 - z), which costs precision when 8 - z is large.
        offsets = expand_groups(q.zero, q.group_size, cols).to(torch.int32)
        codes = codes - offsets + 8
        zero = torch.full_like(zero, 8.0)
    kernel_zero = scale * (8.0 - zero)
    scales_zeros = torch.stack([scale.t(), kernel_zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INT4_TILES)
    notes = [_held_in(q, 4)]
    if q.group_size != group:
        what = "per-channel rows" if q.group_size >= cols else f"g{q.group_size} groups"
        notes.append(f"{what} run as g{group} blocks")
    return Int4Linear(packed, scales_zeros, group, cols, out, bias), "; ".join(filter(None, notes))


def make_native(q: QTensor, bias: torch.Tensor | None
                ) -> tuple[q4_native.NativeLinear | None, str]:
    """The layer on the studio's own kernel (4- or 8-bit layout), or (None, why not)."""
    why = q4_native.unavailable()
    if why:
        return None, why
    tensors, group, why = q4_native.pack(q)
    if tensors is None:
        return None, why
    return q4_native.NativeLinear(tensors, group, q.shape[1], bias, PREFILL_ROWS,
                                  PREFILL_DTYPE), ""


def _held_in(q: QTensor, width: int) -> str:
    return f"{q.bits}-bit codes held in {width} bits" if q.bits < width else ""


def make_int8(q: QTensor, bias: torch.Tensor | None) -> tuple[Int8Linear, str]:
    assert q.group_size >= q.shape[1] and q.scale.shape[1] == 1
    codes = q.codes.to(torch.int16)
    zero = q.zero[:, 0].float()
    scales = q.scale[:, 0].to(torch.bfloat16)
    offset = None
    if q.bits <= 7:
        weight = (codes - zero.to(torch.int16)[:, None]).to(torch.int8)
    else:
        weight = (codes - 128).to(torch.int8)
        if bool((zero != 128).any()):
            offset = q.scale[:, 0].float() * (zero - 128.0)
    note = "" if offset is None else "asymmetric 8-bit: zero points as a per-row term"
    return Int8Linear(weight.contiguous(), scales, offset, bias), note


def kernel_for(name: str, module: nn.Module, q: QTensor, kernels: str = "native"
               ) -> tuple[nn.Module | None, KernelChoice]:
    """The kernel module for one quantized layer, or (None, fallback choice with the reason).
    `kernels`: "native" (the studio's kernels, `q4_native`, for codes of up to 8 bits in groups
    of a multiple of 32, where it builds; torch's otherwise, with the reason) or "torch"
    (torch's int4pack / int8pack)."""
    out, cols = q.shape
    fmt = formats.format_of(q)
    if not fmt.kernels:  # a codebook / vector layer: no low-bit CPU kernel takes its tables
        return None, KernelChoice(name, "fp32 dense", q.bits, out * cols * 4,
                                  f"fallback: no CPU kernel takes {fmt.title} codes; runs "
                                  f"de-quantized in float32")
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.data
    per_channel = q.group_size >= cols
    reason = ""
    try:
        native_why = ""
        if kernels == "native":
            kernel, native_why = make_native(q, bias)
            if kernel is not None:
                width = kernel.bits
                return kernel, KernelChoice(name, f"q{width}native g{kernel.group}", q.bits,
                                            _buffer_bytes(kernel), _held_in(q, width))
        if q.bits <= 4 and int4_group(q) is not None:
            kernel, note = make_int4(q, bias)
            note = "; ".join(filter(None, [note, native_why and f"not native: {native_why}"]))
            return kernel, KernelChoice(name, f"int4pack g{kernel.group}", q.bits,
                                        _buffer_bytes(kernel), note)
        if per_channel:
            kernel, note = make_int8(q, bias)
            note = "; ".join(filter(None, [note, native_why and f"not native: {native_why}"]))
            return kernel, KernelChoice(name, "int8pack", q.bits, _buffer_bytes(kernel), note)
        if q.bits <= 4:
            reason = (f"no int4 kernel group (32/64/128) fits g{q.group_size} over "
                      f"{cols} columns")
        else:
            reason = (f"the int8 kernel takes one scale per output channel; this "
                      f"{q.bits}-bit layer has groups of {q.group_size}")
    except RuntimeError as exc:  # a shape the kernel refuses: say so rather than crash
        reason = f"the kernel refused this layer ({str(exc).splitlines()[0]})"
    return None, KernelChoice(name, "fp32 dense", q.bits, out * cols * 4,
                              f"fallback: {reason}; runs de-quantized in float32")


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers() if b is not None)


# --- whole models --------------------------------------------------------------------------

def float_model(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, list[KernelChoice]]:
    """A copy of `model` in `dtype`, with its layers reported as dense matmuls."""
    copy_ = copy.deepcopy(model)
    dense_layers(copy_)
    copy_ = copy_.to(dtype)
    copy_.eval()
    label = "fp32 dense" if dtype == torch.float32 else "bf16 dense"
    return copy_, _dense_choices(copy_, label, set())


def kernel_model(model: nn.Module, qtensors: dict[str, QTensor], prefill: str = "dense",
                 kernels: str = "native") -> tuple[nn.Module, list[KernelChoice]]:
    """A float32 copy of `model` whose quantized layers (`qtensors`) run on low-bit kernels.

    `model` is the variant's de-quantized float model; layers without a kernel keep its
    de-quantized weights, so the results match it either way. `prefill`: "dense" (calls of
    PREFILL_ROWS rows or more de-quantize once and run a dense GEMM) or "kernel" (always the
    low-bit kernel). `kernels`: the studio's native kernels or torch's (`kernel_for`).
    """
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {PREFILL_MODES}, not {prefill!r}")
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels must be one of {KERNEL_SETS}, not {kernels!r}")
    result = copy.deepcopy(model).float()
    result.eval()
    choices: list[KernelChoice] = []
    for name, q in qtensors.items():
        module = result.get_submodule(name)
        if isinstance(module, CodedEmbedding):   # a lookup reads one row: no matmul to run
            choices.append(KernelChoice(name, "coded rows", q.bits, 0,
                                        "embedding: each looked-up row de-quantized"))
            continue
        kernel, choice = kernel_for(name, module, q, kernels)
        if kernel is not None:
            if prefill == "kernel":
                kernel.prefill_rows = None
            if kernel.prefill_rows is not None:
                dtype = str(PREFILL_DTYPE).replace("torch.", "")
                choice = replace(choice, note="; ".join(filter(None, [
                    choice.note, f"prefill ({kernel.prefill_rows}+ tokens): de-quantized to "
                                 f"{dtype}, dense GEMM"])))
            hooks = move_pre_hooks(module, kernel)
            if hooks:
                choice = replace(choice, note="; ".join(filter(None, [choice.note, hooks])))
            replace_module(result, name, kernel)
        elif choice.fallback:
            log.info("%s: %s", name, choice.note)
        choices.append(choice)
    dense_layers(result)  # the fallbacks: timed as plain float matmuls
    done = {c.layer for c in choices}
    return result, choices + _dense_choices(result, "fp32 dense", done)


def dense_layers(model: nn.Module) -> None:
    """Replace every CodedLinear of `model` (in place) by an nn.Linear holding its de-quantized
    weight, so a benchmark times a float matmul, not the de-quantization as well."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CodedLinear):
            dense = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, device="meta")
            dense.weight = nn.Parameter(module.weight, requires_grad=False)
            dense.bias = module.bias
            move_pre_hooks(module, dense)
            replace_module(model, name, dense)


def _dense_choices(model: nn.Module, label: str, skip: set[str]) -> list[KernelChoice]:
    """Float layers that read weights per token: every Linear/Conv1D and the output head."""
    from studio.core.layers import is_linear

    choices = []
    for name, module in model.named_modules():
        if name in skip or not is_linear(module):
            continue
        w = weight_matrix(module)
        choices.append(KernelChoice(name, label, None, w.numel() * w.element_size()))
    return choices


def kernel_summary(choices: list[KernelChoice]) -> dict[str, int]:
    """kernel name -> number of layers that ran on it (for tables)."""
    summary: dict[str, int] = {}
    for choice in choices:
        key = f"{choice.kernel} (fallback)" if choice.fallback else choice.kernel
        summary[key] = summary.get(key, 0) + 1
    return summary
