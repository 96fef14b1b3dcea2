"""The studio's own int4 decode kernel: q4_native.c (and decode_step.c, `native_step.py`),
compiled on first use, called through ctypes.

torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) de-quantizes its weights to floats
before multiplying; on this AVX2 machine it reads ~3 GB/s of packed weights at batch 1, a
quarter of the memory bandwidth, so a decode step is bound by arithmetic. The C kernel
quantizes the one activation row to int8 per 32 values and multiplies 4-bit codes by it with
integer instructions, as llama.cpp's Q4_1 x Q8 kernels do (`benchmarks/bench_speed.py`
compares the two in one run). The int8 activations cost a small, bounded error (tested against
the float32 product); it is why llama.cpp's figures carry the same error.

The library is built once per source, compiler and CPU into the studio's cache (atomically: a
half-written library is never loaded) with the machine's C compiler (`$CC`, `cc`, `gcc` or
`clang`). Without a compiler, or when the build fails, `unavailable()` says why and every layer
stays on torch's kernel, with that reason in the benchmark's kernel notes.

Layout (`pack`): codes [N, K/2] uint8, each row K/32 blocks of 16 bytes, byte j holding element
j (low nibble) and j + 16 (high); scales and mins [N, K/group] fp16 (their bits held as int16)
with w = code * scale + min.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from studio.core.files import cache_root
from studio.core.quant.grid import QTensor

HERE = Path(__file__).parent
SOURCES = (HERE / "q4_native.c", HERE / "decode_step.c")   # one library (native_step.py)
HEADERS = (HERE / "q4_native.h",)
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-fopenmp-simd")
THREADED = ("-fopenmp",)   # tried first; a compiler without OpenMP builds the one-thread kernel
MACHINE = ("-march=native",)   # AVX2/FMA/F16C where this CPU has them, the portable path if not
FP16_TOLERANCE = 1e-3   # a scale or min that fp16 moves by more than this (relative) stays on torch


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    if os.environ.get("COMPRESSION_STUDIO_NATIVE", "1") == "0":
        return None, "turned off (COMPRESSION_STUDIO_NATIVE=0)"
    cc = compiler()
    if cc is None:
        return None, "no C compiler on this machine (install gcc, or set CC)"
    try:
        return open_library(build(cc, cache_root() / "kernels")), ""
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        return None, f"the kernel did not build ({str(detail).strip().splitlines()[-1][:200]})"


def open_library(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, i32 = ctypes.c_void_p, ctypes.c_int
    library.q4_matmul.argtypes = [pointer] * 4 + [i32] * 4 + [pointer, i32, pointer, i32]
    library.q4_matmul.restype = i32
    library.q4_dequantize.argtypes = [pointer] * 3 + [i32] * 4 + [pointer]
    library.q4_dequantize.restype = None
    library.q4_has_avx2.restype = i32
    library.q4_decode_blocks.argtypes = [pointer, i32, pointer, pointer, pointer, pointer, i32,
                                         i32]
    library.q4_decode_blocks.restype = i32
    library.q4_float_gemv.argtypes = [pointer, pointer, pointer, i32]
    library.q4_float_gemv.restype = None
    return library


def build(cc: str, folder: Path, machine: tuple[str, ...] = MACHINE) -> Path:
    """The compiled library in `folder`, built now when this source/compiler/CPU has none."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    flags = (*FLAGS, *machine)
    texts = [path.read_text() for path in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*texts, cc, version, " ".join(flags),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()
    target = folder / f"q4_native-{key[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        for extra in (THREADED, ()):
            done = subprocess.run([cc, *flags, *extra, *map(str, SOURCES), "-o", scratch,
                                   "-lm"], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        done.check_returncode()
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library() -> ctypes.CDLL | None:
    return _load()[0]


def unavailable() -> str:
    """Why the native kernel cannot run here ("" when it can)."""
    return _load()[1]


def describe() -> str:
    """The kernel's name in benchmark reports: which instructions it was built with."""
    lib = library()
    if lib is None:
        return "unavailable"
    return "AVX2 int8 dot products" if lib.q4_has_avx2() else "portable C (no AVX2)"


# --- packing ---------------------------------------------------------------------------------

def kernel_group(q: QTensor) -> int | None:
    """The group the kernel runs q's layer in: a multiple of 32 dividing the input width and
    q's own group size (each of q's groups covering whole kernel groups); None if none does."""
    cols = q.shape[1]
    group = math.gcd(min(q.group_size, cols), cols)
    return group if q.bits <= 8 and group % 32 == 0 else None


def width_of(q: QTensor) -> int:
    """The layout's code width: 4 bits for codes of up to 4 bits, else 8."""
    return 4 if q.bits <= 4 else 8


def pack(q: QTensor) -> tuple[dict[str, torch.Tensor] | None, int | None, str]:
    """(codes, scales, mins) in the kernel's layout, the group it runs, and "" — or
    (None, None, why not) when the layer cannot run on it."""
    out, cols = q.shape
    group = kernel_group(q)
    if group is None:
        return None, None, (f"the native kernels take codes of up to 8 bits in groups of a "
                            f"multiple of 32 dividing {cols} columns; this layer is "
                            f"{q.bits}-bit g{q.group_size}")
    blocks = cols // group
    repeat = min(q.group_size, cols) // group
    # 8-bit codes are stored as code - 128 (signed bytes), so their min gains 128 * scale.
    shift = 0.0 if width_of(q) == 4 else 128.0
    scale = q.scale.float().repeat_interleave(repeat, dim=1)[:, :blocks]
    minimum = ((shift - q.zero.float()) * q.scale.float()).repeat_interleave(
        repeat, dim=1)[:, :blocks]
    halves = [scale.to(torch.float16), minimum.to(torch.float16)]
    for exact, half in zip((scale, minimum), halves):
        drift = (half.float() - exact).abs() / exact.abs().clamp_min(1e-30)
        if not torch.isfinite(half).all() or bool((drift[exact != 0] > FP16_TOLERANCE).any()):
            return None, None, "scales outside fp16's range: kept on torch's kernel"
    if width_of(q) == 4:
        codes = q.codes.to(torch.uint8).view(out, cols // 32, 2, 16)
        packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(out, cols // 2).contiguous()
    else:
        packed = (q.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    # fp16 bits held as int16, so a module-wide .float() / .half() never converts them.
    return {"codes": packed, "scales": halves[0].contiguous().view(torch.int16),
            "mins": halves[1].contiguous().view(torch.int16)}, group, ""


# --- calls -----------------------------------------------------------------------------------

def bits_of(tensors: dict[str, torch.Tensor]) -> int:
    """The layout's code width, from its codes' dtype (uint8 nibble pairs or int8 codes)."""
    return 8 if tensors["codes"].dtype == torch.int8 else 4


def matmul(tensors: dict[str, torch.Tensor], group: int, x: torch.Tensor,
           bias: torch.Tensor | None, library: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous @ W.T (+ bias): [M, N] float32. `library`: another build
    of the kernel (tests compare the portable one), else this machine's."""
    codes, bits = tensors["codes"], bits_of(tensors)
    n, k = codes.shape[0], codes.shape[1] * 8 // bits
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    status = (library or _load()[0]).q4_matmul(
        codes.data_ptr(), tensors["scales"].data_ptr(), tensors["mins"].data_ptr(),
        None if bias is None else bias.data_ptr(), bits, n, k, group, x.data_ptr(),
        x.shape[0], y.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("the native kernel could not allocate its activation buffer")
    return y


def dequantize(tensors: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """W [N, K] float32, for a prefill's dense GEMM."""
    codes, bits = tensors["codes"], bits_of(tensors)
    n, k = codes.shape[0], codes.shape[1] * 8 // bits
    weight = torch.empty(n, k, dtype=torch.float32)
    library().q4_dequantize(codes.data_ptr(), tensors["scales"].data_ptr(),
                            tensors["mins"].data_ptr(), bits, n, k, group, weight.data_ptr())
    return weight


# --- the layer -------------------------------------------------------------------------------

class NativeLinear(nn.Module):
    """y = x @ W.T + b on the native kernel (4- or 8-bit layout, `bits`): float32 in and out
    (no bf16 casts). Calls of `prefill_rows` rows or more de-quantize once to `prefill_dtype`
    and run one dense GEMM (kernels.py says why)."""

    def __init__(self, tensors: dict[str, torch.Tensor], group: int, in_features: int,
                 bias: torch.Tensor | None, prefill_rows: int | None,
                 prefill_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.group, self.bits = in_features, group, bits_of(tensors)
        self.out_features = tensors["codes"].shape[0]
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.prefill_rows, self.prefill_dtype = prefill_rows, prefill_dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales, "mins": self.mins}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if self.prefill_rows is not None and flat.shape[0] >= self.prefill_rows:
            weight = dequantize(self.tensors(), self.group).to(self.prefill_dtype)
            bias = None if self.bias is None else self.bias.to(self.prefill_dtype)
            y = nn.functional.linear(flat.to(self.prefill_dtype), weight, bias).float()
        else:
            y = matmul(self.tensors(), self.group, flat, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
