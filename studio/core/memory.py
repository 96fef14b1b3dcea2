"""The memory guard: what a job will need at its peak, said before it starts (issues 16, 17).

    estimate = estimate_job(handle, "quantize", method=name, windows=64, seqlen=512)
    guard(estimate)       # NotEnoughMemory naming both numbers and what would fit, or nothing

An estimate is the process's resident memory now (Python, torch, the tokenizer and a model held
in memory) plus what the job adds at its peak, from shapes and settings alone: a model held in
float32 counts its copies; a streamed model (`streaming.py`) counts one block in float32, the
largest single layer it reads (often the embedding / lm_head), and the activations. Parts are
named so the message can say what dominates. The factors below were fitted on the demo and the
synthetic 3B of `benchmarks/bench_large.py` (figures in docs/decisions/streaming.md).

Also here: giving freed memory back to the operating system. torch's CPU tensors come from the
C library's malloc; after a block of quantization glibc keeps freed batch temporaries in its
heaps, so the resident size ratchets up by hundreds of MB nothing uses. `malloc_trim(0)`
returns those pages; elsewhere (macOS, musl, Windows) there is no such call and it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass, field

import psutil

from studio.core.errors import NotEnoughMemory

GIB = 2 ** 30
# Left free for the rest of the system and the window: a job may use what is available less this.
RESERVE = 256 * 2 ** 20
# Temporaries of a float32 forward per activation element: attention scores, the MLP's
# intermediate, norms (fitted: a 512-token window of the demo).
FORWARD_COPIES = 6
# Python, torch and transformers' model code, resident before any weight (measured: 440-460
# MiB after opening the demo, whose weights are not yet paged in, or a streamed 3B model).
RUNTIME = 440 * 2 ** 20
# Copies of a layer's weight while weight statistics run on it (float32, |w|, sorted sample...).
STATS_COPIES = 3


@dataclass
class Estimate:
    what: str
    now: int                                   # resident bytes before the job
    parts: dict[str, int] = field(default_factory=dict)   # what the job adds, by name
    offers: list[str] = field(default_factory=list)       # settings that need less

    @property
    def added(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        return self.now + self.added

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        inside = ", ".join(f"{k} {v / GIB:.2f}" for k, v in big if v > 0)
        return (f"{self.what} needs about {self.added / GIB:.1f} GiB of memory beyond the "
                f"{self.now / GIB:.1f} GiB in use ({inside} GiB)")


def available() -> int:
    return max(0, psutil.virtual_memory().available - RESERVE)


def resident() -> int:
    return psutil.Process().memory_info().rss


def guard(estimate: Estimate, free: int | None = None) -> Estimate:
    """Go ahead (return the estimate) or refuse with both numbers and what would fit."""
    free = available() if free is None else free
    if estimate.added > free:
        offers = f" To fit: {'; '.join(estimate.offers)}." if estimate.offers else ""
        raise NotEnoughMemory(f"{estimate.describe()}, but only {free / GIB:.1f} GiB is "
                              f"available.{offers}")
    return estimate


# --- estimates ---------------------------------------------------------------------------------

def model_shape(model) -> dict:
    """Sizes the estimates need, from the config and the tensors' shapes (none is read)."""
    from studio.core.quant.blocks import decoder_blocks
    from studio.core.quant.coded import CodedLinear
    from studio.core.streaming import streams

    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or getattr(text, "ffn_dim", 0)
                or getattr(text, "n_inner", 0) or 4 * hidden)

    def own(module) -> int:
        coded = module.qt.numel() if isinstance(module, CodedLinear) else 0
        return coded + sum(p.numel() for p in module.parameters(recurse=False))

    _, blocks = decoder_blocks(model)
    block_params = max(sum(own(m) for m in block.modules()) for block in blocks)
    linears = sum(own(m) for block in blocks for m in block.modules()
                  if isinstance(m, CodedLinear) or m.__class__.__name__ in ("Linear", "Conv1D"))
    largest = max(own(m) for m in model.modules())
    largest_linear = max((own(m) for block in blocks for m in block.modules()
                          if isinstance(m, CodedLinear)
                          or m.__class__.__name__ in ("Linear", "Conv1D")), default=0)
    return {"hidden": hidden, "intermediate": inter,
            "vocab": int(getattr(text, "vocab_size", 0) or 0), "block_params": block_params,
            "largest_layer": largest, "largest_linear": largest_linear,
            "quantizable": linears, "blocks": len(blocks),
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "streamed": streams(model)}


def now_with_weights(model, streamed: bool) -> int:
    """Resident memory now, counting weights held in memory as resident: a safetensors load
    maps them and pages them in on first use, so right after opening they do not show yet."""
    if streamed:
        return resident()
    from studio.core.layers import model_bytes
    return max(resident(), RUNTIME + model_bytes(model))


def estimate_open(params: int, streamed: bool, vocab_bytes: int = 0,
                  layers: list | None = None) -> Estimate:
    """Opening: the float32 weights when held in memory; when streamed, the skeleton (the
    inventory and the tokenizer, `vocab_bytes` on disk, parsed at ~3x) and, as the least any
    job needs, one block and the largest layer in float32 (`layers`: the inventory)."""
    est = Estimate("Opening the model", resident(), {"tokenizer": 3 * vocab_bytes})
    if streamed and layers:
        blocks: dict[int, int] = {}
        for info in layers:
            if info.block is not None:
                blocks[info.block] = blocks.get(info.block, 0) + info.params
        est.what = "The smallest job on this streamed model"
        est.parts["one block in float32"] = 4 * max(blocks.values(), default=0)
        est.parts["largest layer read"] = 4 * max(i.params for i in layers)
        est.offers.append("a machine with more memory: even streamed, one block and the "
                          "largest layer must fit")
    if not streamed:
        est.parts["float32 weights"] = 4 * params
        est.offers.append("open it with --weights stream (the weights stay in their files)")
    return est


def estimate_job(handle, kind: str, method: str | None = None, windows: int = 1, seqlen: int = 512,
                 variant: bool = False) -> Estimate:
    """A job's peak on `handle` (a ModelHandle or a model): kind is stats, quantize, eval,
    capture, sensitivity, bench."""
    model = getattr(handle, "model", handle)
    s = model_shape(model)
    streamed = s["streamed"]
    tokens = windows * seqlen
    est = Estimate(_TITLES.get(kind, kind), now_with_weights(model, streamed))
    p = est.parts
    from studio.core.streaming import READ_CHUNK
    largest_read = 4 * s["largest_layer"] + 2 * READ_CHUNK
    if streamed and kind not in ("stats", "quantize"):
        # the largest layer read into float32 (a chunk at a time), e.g. the lm_head
        p["largest layer read"] = largest_read
    if kind == "stats":
        from studio.core.stats import CHUNK_ELEMENTS, CHUNKED_ABOVE
        largest = s["largest_layer"]
        if streamed:   # read as stored (16-bit), then in row chunks
            p["largest layer read"] = 2 * largest
        if largest > CHUNKED_ABOVE:
            p["statistics temporaries"] = STATS_COPIES * 8 * CHUNK_ELEMENTS
        else:   # |w| and the centred copy (the histogram's bins come after they are freed)
            p["statistics temporaries"] = 2 * 4 * largest
    elif kind in ("eval", "capture", "sensitivity", "bench"):
        batch_tokens = seqlen  # one window per forward
        p["logits"] = 3 * 4 * batch_tokens * s["vocab"]
        p["activations"] = FORWARD_COPIES * 4 * batch_tokens * (s["hidden"] + s["intermediate"])
        if variant and not streamed:   # (`coded.expanded` holds them for the whole run)
            p["de-quantized layers"] = 4 * s["quantizable"]
        if variant and streamed:   # a layer's codes read from its file and de-quantized as it
            # runs (variant_stream.StoredCodes): the codes, their unpacked ints, the float32
            p["layer de-quantized"] = 3 * 4 * s["largest_linear"]
        if kind == "sensitivity":
            p["block copies"] = 2 * 4 * s["block_params"]
            p["calibration activations"] = 2 * 4 * tokens * s["hidden"]
        if kind == "capture":
            p["calibration activations"] = 4 * tokens * s["hidden"]
    elif kind == "quantize":
        p["block in float32"] = 4 * s["block_params"]
        if streamed:   # the baseline's weight of a layer, read for its error figures
            p["baseline layer read"] = 4 * s["intermediate"] * s["hidden"]
        from studio.core.quant import registry
        quantizer = registry.get(method or registry.REFERENCE)
        hessian = quantizer.calibration == "hessian"
        carries_all = quantizer.smoothing or (quantizer.calibration != "none"
                                              and quantizer.windows_used is None)
        carried = tokens if carries_all else min(tokens, 8 * seqlen)
        p["calibration activations"] = 4 * carried * s["hidden"] * (2 if quantizer.smoothing
                                                                     else 1)
        if hessian:
            p["Hessians"] = 3 * 4 * max(s["hidden"], s["intermediate"]) ** 2
            # (quantize.replay_budget: twice a block's float32 bytes streamed, half the model's
            # held)
            p["replay stash"] = min(4 * carried * (3 * s["hidden"] + s["intermediate"]),
                                    8 * s["block_params"] if streamed else 2 * s["params"])
        codes = s["quantizable"] // 2 + s["quantizable"] // 16
        # streamed: a block's codes go to their file when the block is done (variant_stream)
        p["codes"] = -(-codes // max(1, s["blocks"])) if streamed else codes
        p["batch temporaries"] = FORWARD_COPIES * 4 * 4 * seqlen * (s["hidden"] + s["intermediate"])
        if not streamed:
            p["copied floats"] = 4 * s["block_params"]
        if streamed:
            # The embedding is read while block 0's inputs are captured, before any block's
            # work or codes: only what it needs beyond the blocks' phase counts.
            capture = largest_read + p["calibration activations"]
            p["embedding read (capture)"] = max(0, capture - sum(p.values()))
        est.offers.append(f"fewer calibration windows than {windows}"
                          if hessian else "a shorter sequence length")
    if not streamed and kind in ("quantize", "sensitivity"):
        est.offers.append("open the model with --weights stream (one block in memory)")
    if kind in ("eval", "bench", "sensitivity", "capture") and seqlen > 256:
        est.offers.append(f"a shorter sequence length than {seqlen}")
    return est


_TITLES = {"stats": "Weight statistics", "quantize": "Quantization", "eval": "Evaluation",
           "capture": "Activation capture", "sensitivity": "The sensitivity sweep",
           "bench": "The benchmark"}


def guard_convert(param_count: int, what: str) -> None:
    """A GGUF is de-quantized to float32 in a child process that holds about two copies."""
    est = Estimate(f"De-quantizing {what}", 0, {"float32 weights, twice": 8 * param_count})
    guard(est)


# --- giving memory back ------------------------------------------------------------------------

@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
