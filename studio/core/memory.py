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
# Copies of a layer's weight while its error figures are computed (fitted, `_error_figure_parts`)
ERROR_TERM_COPIES = 4
# float32 copies of a layer's weight while it is rounded without text (fitted on the 3B cut's
# MLP layers: 1707-1719 MiB peak, 9 copies beyond the block; `_no_text_quantize_parts`)
ROUNDING_COPIES = 9
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

    def inputs(module) -> int:   # a linear's input width (GPT-2's Conv1D stores [in, out])
        width = getattr(module, "in_features", None)
        return int(width) if width is not None else int(module.weight.shape[0])

    _, blocks = decoder_blocks(model)
    block_params = max(sum(own(m) for m in block.modules()) for block in blocks)
    linears = [m for block in blocks for m in block.modules()
               if isinstance(m, CodedLinear) or m.__class__.__name__ in ("Linear", "Conv1D")]
    largest = max(own(m) for m in model.modules())
    coded = sum(m.qt.numel() for m in model.modules() if isinstance(m, CodedLinear))
    return {"hidden": hidden, "intermediate": inter,
            "vocab": int(getattr(text, "vocab_size", 0) or 0), "block_params": block_params,
            "largest_layer": largest, "quantizable": sum(own(m) for m in linears),
            "largest_linear": max((own(m) for m in linears), default=0),
            "linear_inputs": sum(inputs(m) for m in linears), "blocks": len(blocks),
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "coded": coded,   # weights held as codes (a variant's), not among the parameters
            "streamed": streams(model)}


def now_with_weights(model, streamed: bool, beside=()) -> int:
    """Resident memory now, counting weights held in memory as resident: a safetensors load
    maps them and pages them in on first use, so right after opening they do not show yet.
    `beside`: other models the job runs too (a variant's baseline)."""
    if streamed:
        return resident()
    from studio.core.layers import model_bytes
    from studio.core.streaming import streams
    held = sum(model_bytes(m) + _codes_bytes(m)
               for m in {id(m): m for m in (model, *beside)}.values() if not streams(m))
    return max(resident(), RUNTIME + held)


def _codes_bytes(model) -> int:
    """What a variant's coded layers hold (packed codes, scales, tables): not parameters."""
    import torch

    from studio.core.quant.coded import CodedLinear

    return sum(t.numel() * t.element_size() for m in model.modules()
               if isinstance(m, CodedLinear)
               for t in vars(m.qt).values() if isinstance(t, torch.Tensor))


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
                 variant: bool = False, proxy_windows: int = 0, proxy_tokens: int = 0,
                 beside=(), runtime: int = 0, extra: dict[str, int] | None = None
                 ) -> Estimate:
    """A job's peak on `handle` (a ModelHandle or a model): kind is stats, quantize, eval,
    capture, sensitivity, export (`handle`: the variant's model). `windows` are the
    calibration windows (quantize, capture), the windows of one forward (eval, export) or the
    KL sweep's windows (sensitivity, whose proxy part reads `proxy_windows` and keeps
    `proxy_tokens` rows of every layer's input). `beside`: the models the job runs beside
    this one (an evaluation's baseline), whose weights count as held. `runtime`: an export's
    consumer running in a process of its own (`ExportFormat.runtime_bytes`). `extra`: named
    parts the caller knows of (an export format's own readers: `ExportFormat.studio_bytes`)."""
    model = getattr(handle, "model", handle)
    s = model_shape(model)
    streamed = s["streamed"]
    tokens = windows * seqlen
    est = Estimate(_TITLES.get(kind, kind), now_with_weights(model, streamed, beside))
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
    elif kind == "eval":
        logits = 4 * tokens * s["vocab"]   # one float32 copy (`windows`: those of one forward)
        p["activations"] = FORWARD_COPIES * 4 * tokens * (s["hidden"] + s["intermediate"])
        if beside:   # the baseline's summary (NLL, top-256 ids and log-probs: baseline_cache),
            # not its logits: they are gone once summarised
            from studio.core.baseline_cache import TOP_K
            p["baseline's top-K summary"] = 8 * TOP_K * tokens
        if not streamed:
            p["logits"] = 3 * logits
            if variant:   # (`coded.expanded` holds them for the whole run)
                p["de-quantized layers"] = 4 * s["quantizable"]
        else:
            # One layer at a time, so the peak is the largest of the forward's moments: the
            # head's weight read with its product (let go before the log-softmax and the
            # scores: counting all three copies beside the read over-estimated the 3B cut by
            # 25%), the logits' three copies, or a variant's layer de-quantized as it runs
            # (variant_stream.StoredCodes: the codes, their unpacked ints, the float32).
            read = p.pop("largest layer read")
            moments = {"largest layer read, with its logits": read + logits,
                       "logits": 3 * logits,
                       "layer de-quantized": 3 * 4 * s["largest_linear"] if variant else 0}
            moment = max(moments, key=moments.get)
            p[moment] = moments[moment]
    elif kind == "capture":
        from studio.core.activations import BATCH_TOKENS, MAX_SAMPLES
        batch = max(1, BATCH_TOKENS // seqlen) * seqlen   # tokens per forward (no logits)
        p["activations"] = FORWARD_COPIES * 4 * batch * (s["hidden"] + s["intermediate"])
        # per input tensor (about four a block) a histogram sample; per block and token three
        # figures of the residual stream
        p["recorded inputs"] = 4 * s["blocks"] * 4 * MAX_SAMPLES
        p["residual stream figures"] = 12 * (s["blocks"] + 1) * tokens
    elif kind == "sensitivity":
        p.update(_sensitivity_parts(s, windows, seqlen, proxy_windows, proxy_tokens))
    elif kind == "export" and streamed:
        p.update(_streamed_export_parts(model, s, tokens, p["largest layer read"]))
        if runtime:   # llama.cpp computing the file's logits, the file mapped in its process
            p["the consumer's own process"] = runtime
    elif kind == "export":
        # written a tensor at a time, then re-opened by the consumer's loader as a float32
        # model (a GGUF is first de-quantized: `estimate_convert`) whose
        # logits are compared with the variant's on `windows` x `seqlen` tokens; a split GGUF
        # is read a tensor at a time instead and run by llama.cpp in its own process
        if runtime:
            p["the consumer's own process"] = runtime
        else:
            p["re-opened model in float32"] = 4 * (s["params"] + s["coded"])
        # the variant's layers de-quantized for the weight and logit comparisons
        p["de-quantized layers"] = 4 * s["quantizable"]
        p["logits of both"] = 2 * 3 * 4 * tokens * s["vocab"]
        p["activations"] = FORWARD_COPIES * 4 * tokens * (s["hidden"] + s["intermediate"])
    elif kind == "quantize" and not windows:
        p.update(_no_text_quantize_parts(s, streamed))
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
        if windows and not hessian:
            p.update(_error_figure_parts(s))
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
    p.update(extra or {})
    if not streamed and kind in ("quantize", "sensitivity"):
        est.offers.append("open the model with --weights stream (one block in memory)")
    if kind == "sensitivity" and windows:
        est.offers.append("the proxy-only sweep (no KL windows)")
    return est


def _streamed_export_parts(model, s: dict, tokens: int, forward_read: int) -> dict[str, int]:
    """A streamed variant's export (export/safetensors_stream, export/streamed_reload): written
    and verified a tensor at a time, so its peak is the largest of its phases, each holding
    one tensor or one layer. The verification's forwards (the variant's, then the re-opened
    file's: the largest layer read, logits, activations) are counted by the caller; what a
    phase needs beyond them is counted here."""
    from studio.core.export.gguf import FLOAT_ROWS_ELEMENTS
    from studio.core.export.job import COMPARE_CHUNK

    stored = max((p.element_size() for p in model.parameters()), default=4)
    largest = s["largest_layer"]
    logits = 2 * 3 * 4 * tokens * s["vocab"]
    activations = FORWARD_COPIES * 4 * tokens * (s["hidden"] + s["intermediate"])
    phases = {
        # read as stored, converted into the file's type a block of rows at a time
        "writing": 2 * stored * largest + 3 * 4 * FLOAT_ROWS_ELEMENTS,
        # compared a chunk at a time as read (a GGUF's float tensor is read whole, as stored)
        "comparing floats": stored * largest + 4 * 4 * COMPARE_CHUNK,
        # the variant's codes and weights, the file's de-compressed weights, their difference
        "comparing a layer": 5 * 4 * s["largest_linear"],
    }
    phase = max(phases, key=phases.get)
    return {
        "logits of both": logits,
        "activations": activations,
        # compressed-tensors keeps each layer's scales and zero points between its two passes
        "scales kept while writing": s["coded"] // 16,
        f"{phase} (beyond the forwards)": max(0, phases[phase]
                                              - (forward_read + logits + activations)),
    }


def _no_text_quantize_parts(s: dict, streamed: bool) -> dict[str, int]:
    """Quantizing without text (RTN and the like: no forward, no error figures, no embedding
    read): a block in float32, its codes, and the rounding of its largest layer, whose
    temporaries (groups, scales, codes, the de-quantized copy, their differences) were
    ROUNDING_COPIES float32 copies of it at the peak. The estimate with text stood in for
    them with the capture's embedding read: +15% on the 3B cut, +13% on the demo."""
    codes = s["quantizable"] // 2 + s["quantizable"] // 16
    parts = {"block in float32": 4 * s["block_params"],
             "rounding a layer": ROUNDING_COPIES * 4 * s["largest_linear"],
             "codes": -(-codes // max(1, s["blocks"])) if streamed else codes}
    if not streamed:
        parts["copied floats"] = 4 * s["block_params"]
    return parts


def _error_figure_parts(s: dict) -> dict[str, int]:
    """What a block quantized from its inputs as they arrive (RTN, AWQ, SmoothQuant: not
    GPTQ, whose own parts count its Hessians) keeps for its layers' error figures
    (`quantize.quantize_block`): every linear's weight before rounding, the statistics of each
    input the block's linears read (for a Llama-like block: attention input and output, MLP
    input at the hidden width, the down projection's at the intermediate), and one layer's
    error terms being computed. Missing before: the guard under-estimated RTN with its error
    windows on the 3B by 24% (2058 MiB estimated, 2698 measured)."""
    return {"weights before rounding (error figures)": 4 * s["block_params"],
            "input statistics (error figures)": 4 * (3 * s["hidden"] ** 2
                                                     + s["intermediate"] ** 2),
            # W - Q, (W - Q) H, W H and their products for the layer and its RTN reference
            # (fitted on the 2-block cut of the 3B: 2539 MiB peak during down_proj)
            "error terms of a layer": ERROR_TERM_COPIES * 4 * s["largest_linear"]}


# Settings a refused job could lower, per kind: (name, how the offer names it, least value).
SHRINKABLE = {
    "quantize": [("windows", "calibration windows", 1), ("seqlen", "tokens per window", 128)],
    "capture": [("windows", "windows", 1), ("seqlen", "tokens per window", 128)],
    "sensitivity": [("windows", "KL windows", 1), ("proxy_tokens", "proxy rows per layer", 64),
                    ("seqlen", "tokens per window", 128)],
    "eval": [("windows", "windows per forward pass", 1), ("seqlen", "tokens per window", 128)],
}


def guard_job(handle, kind: str, free: int | None = None, **settings) -> Estimate:
    """`guard(estimate_job(handle, kind, **settings))`; a refusal names, for each setting the
    job could lower on its own, the largest value that fits (e.g. "at most 24 calibration
    windows (64 asked)")."""
    free = available() if free is None else free
    estimate = estimate_job(handle, kind, **settings)
    if estimate.added > free:
        estimate.offers[:0] = [
            f"at most {fit} {label} ({settings[name]} asked)"
            for name, label, least in SHRINKABLE.get(kind, [])
            if (fit := _largest_that_fits(handle, kind, settings, name, least, free))]
    return guard(estimate, free)


def _largest_that_fits(handle, kind: str, settings: dict, name: str, least: int,
                       free: int) -> int | None:
    """The largest value of setting `name` below the asked one that fits (estimates grow with
    it), or None: a bisection over whole numbers."""
    asked = settings.get(name) or 0
    if asked <= least:
        return None

    def fits(value: int) -> bool:
        return estimate_job(handle, kind, **{**settings, name: value}).added <= free

    if not fits(least):
        return None
    low, high = least, asked - 1    # fits(low) holds; find the largest such value
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _sensitivity_parts(s: dict, kl_windows: int, seqlen: int, proxy_windows: int,
                       proxy_tokens: int) -> dict[str, int]:
    """The sweep's two phases, whichever needs more: the proxy runs `proxy_windows` through
    the model at once and keeps `proxy_tokens` input rows of every layer; the KL sweep keeps
    every block's output and the baseline's logits on `kl_windows`, and runs one block copy."""
    width = s["hidden"] + s["intermediate"]
    proxy = {"activations": FORWARD_COPIES * 4 * max(1, proxy_windows) * seqlen * width,
             "layer inputs kept": 4 * proxy_tokens * s["linear_inputs"]}
    if not kl_windows:
        return proxy
    tokens = kl_windows * seqlen
    kl = {"activations": FORWARD_COPIES * 4 * tokens * width,
          "block outputs kept": 4 * (s["blocks"] + 1) * tokens * s["hidden"],
          # the baseline's logits and softmax kept; a variant's logits, their difference,
          # its expm1 and a product inside vecdot while one is scored (sensitivity.py's
          # BaselineScores; measured on the demo at 8 x 512: 6637 MiB)
          "baseline logits and softmax": 2 * 4 * tokens * s["vocab"],
          "logits being scored": 4 * 4 * tokens * s["vocab"],
          "block copy": 4 * s["block_params"]}
    return max(proxy, kl, key=lambda parts: sum(parts.values()))


def estimate_bench(targets, tokens: int) -> Estimate:
    """The benchmark's peak: its targets are built one at a time, each a float32 copy of the
    model it was made from (then converted or packed), with a `tokens`-long KV cache."""
    sources = [t.model for t in targets if getattr(t, "model", None) is not None]
    if not sources:   # llama.cpp targets run in a child process of their own
        return Estimate("The benchmark", resident())
    largest = max(sources, key=lambda m: model_shape(m)["params"])
    s = model_shape(largest)
    est = Estimate("The benchmark", now_with_weights(largest, s["streamed"]))
    est.parts["the target's float32 copy"] = 4 * s["params"]
    # int4/int8 targets: a byte per weight of codes (block layers and the output head), held
    # while the kernels pack them at half a byte (measured on the demo: 1762 MiB peak)
    heads = s["vocab"] * s["hidden"]
    est.parts["codes and packed kernels"] = 3 * (s["quantizable"] + heads) // 2
    est.parts["activations"] = FORWARD_COPIES * 4 * tokens * (s["hidden"] + s["intermediate"])
    est.parts["KV cache"] = 2 * 4 * s["blocks"] * tokens * s["hidden"]
    est.offers.append("the llama.cpp backend on a GGUF of the model (it runs in a process "
                      "of its own and reads the file as it is)")
    return est


_TITLES = {"stats": "Weight statistics", "quantize": "Quantization", "eval": "Evaluation",
           "capture": "Activation capture", "sensitivity": "The sensitivity sweep"}


def guard_convert(summary, file_bytes: int, what: str, in_process: bool,
                  streamed: bool = False) -> Estimate:
    """Refuse a GGUF's first open that would not fit (`estimate_convert`), or return the
    estimate."""
    return guard(estimate_convert(summary, file_bytes, what, in_process, streamed))


def estimate_convert(summary, file_bytes: int, what: str, in_process: bool,
                     streamed: bool = False) -> Estimate:
    """De-quantizing a GGUF (`summary`: its header) to float32. In this process
    (`gguf_fast`, two threads, tensors in file order): the float32 weights as they accumulate,
    each tensor in flight twice while gguf-py de-quantizes it (its float32 result and an
    intermediate of the same size), the file's pages, and the tokenizer made from the header's
    vocabulary (TOKENIZER_PER_HEADER_BYTE, fitted on the demo). The model is then built on the
    same tensors, and safetensors writes the cache from them: no second copy. Measured on the demo
    (134.5 M parameters, a 94 MiB file, first open after the window's imports): 646 MiB added
    (two runs: 645, 647), estimated 646. In a child process (transformers' loader): about two
    float32 copies. `streamed`: written into the cache tensor by tensor
    (`estimate_streamed_convert`)."""
    params = summary.param_count
    if not in_process:
        return Estimate(f"De-quantizing {what}", resident(),
                        {"float32 weights, twice": 8 * params})
    if streamed:
        return estimate_streamed_convert(summary, what)
    sizes = [4 * t.n_elements for t in summary.tensors]
    held, peak = 0, 0
    for i, size in enumerate(sizes):   # the tensors before i held, i and the next in flight
        peak = max(peak, held + 2 * sum(sizes[i: i + DEQUANTIZE_THREADS]))
        held += size
    return Estimate(f"De-quantizing {what}", resident(), {
        "float32 weights, with the tensors being de-quantized": peak,
        "the GGUF file, read": file_bytes,
        "the tokenizer and the header's tables": TOKENIZER_PER_HEADER_BYTE * summary.data_start},
        [("open it with --weights stream (written into its cache a tensor at a time, then "
          "read from there a layer at a time)")])


def estimate_streamed_convert(summary, what: str) -> Estimate:
    """A first open written into the cache tensor by tensor (`gguf_fast.convert_fast_job`):
    one tensor in float32 being written while the next DEQUANTIZE_THREADS are de-quantized,
    each in flight with its float32 result and gguf-py's temporaries (as large again, or for
    a tensor de-quantized a block of rows at a time, three float32 blocks of CHUNK_ELEMENTS),
    its stored bytes read with file reads (the file's pages are not mapped: they do not stay
    resident). The largest such window of the file order, not the model: a 3B model's is its
    embedding; the tokenizer as in the in-memory estimate."""
    elements = [t.n_elements for t in summary.tensors]

    def in_flight(i: int) -> int:
        if i >= len(elements):
            return 0
        n = elements[i]
        if n <= DEQUANTIZE_CHUNK:   # its stored bytes and an intermediate as large as it
            return 4 * n + 4 * n + summary.tensors[i].nbytes
        return 4 * n + 3 * 4 * DEQUANTIZE_CHUNK   # a block's bytes, intermediate and result

    peak = max((4 * (elements[i - 1] if i else 0)
                + sum(in_flight(j) for j in range(i, i + DEQUANTIZE_THREADS))
                for i in range(len(elements))), default=0)
    return Estimate(f"De-quantizing {what} tensor by tensor into its cache", resident(), {
        "the tensors being de-quantized and written": peak,
        "the tokenizer and the header's tables": TOKENIZER_PER_HEADER_BYTE * summary.data_start},
        [("a machine with more memory: even written tensor by tensor, the largest tensors "
          "being de-quantized must fit")])


# gguf_fast.WORKERS (not imported: this module is imported before torch)
DEQUANTIZE_THREADS = 2
# gguf_fast.CHUNK_ELEMENTS: a larger tensor is de-quantized a block of rows at a time
DEQUANTIZE_CHUNK = 32 * 2**20
# What a GGUF's tokenizer and the readers' tables hold per byte of its header (the vocabulary):
# the demo's 1.70 MiB header, 36 MiB above its weights and file at the peak of a first open
# (fitted on that one file: a vocabulary's strings and merges as Python and Rust objects).
TOKENIZER_PER_HEADER_BYTE = 21


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
