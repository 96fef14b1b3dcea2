"""Local CPU benchmarks: prefill latency, decode tokens/s, memory and size, per configuration.

Every configuration (a *target*) builds its own model copy: fp32 and bf16 dense copies of the
baseline, int8 / int4 weight-only copies quantized on the fly with round-to-nearest, or a
quantized variant on its own kernels (`studio.core.kernels`). Each is measured the same way:

* prefill: one forward pass over `prompt_tokens` tokens (the next-token logits only, as an
  inference engine computes them), milliseconds;
* decode: `new_tokens` greedy steps at batch 1 with the KV cache, tokens per second
  (Llama-family models through `LeanDecoder`, the same modules without transformers'
  per-step plumbing; other models through their transformers forward);
* repeated `repeat` times after one warm-up run: median, min and max are reported;
* memory: the process's peak RSS while the target runs (psutil, sampled). It counts all the
  process holds (the baseline the app keeps open too), so `runtime_mb`, the bytes of the
  target's own tensors as they run (floats in fp32, kernel layouts), is given beside it;
* size (`size_mb` = `model_mb`): what the target weighs as an export stores it, with its
  breakdown (quantized layers / embedding and lm_head / other floats), the one size quantize,
  Compare and export report: a variant's `size_breakdown`, and the same count for the float
  and on-the-fly int8 / int4 models (`variant.planned_breakdown`); a GGUF's bytes on disk.

Targets run on a backend (`studio.core.backends`): torch (the above), or llama.cpp for a GGUF
file (`gguf_target`), timed the same way with the same prompt ids and lengths. Every result
records its backend, threads, build and kernels. An optional backend's target that cannot run
(binding missing, file it cannot load) comes back as a result with `error` set and no figures,
so the other targets' figures still come out.

Results are returned only when every target has finished: a cancelled benchmark reports nothing.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import psutil
import torch
from torch import nn

from studio.core import garbage
from studio.core.backends import get_backend, gguf_label
from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress
from studio.core.kernels import KernelChoice, float_model, kernel_model, kernel_summary
from studio.core.layers import model_bytes, weight_matrix
from studio.core.lean_decoder import LeanDecoder, lean_problem, lean_supported
from studio.core.memory import estimate_bench, guard
from studio.core.plan import QuantSpec
from studio.core.quant.grid import quantize_rtn
from studio.core.variant import planned_breakdown

BASE_CONFIGS = ("fp32", "bf16", "int8", "int4")
INT8_SPEC = QuantSpec(bits=8, group_size=-1, symmetric=True)


@dataclass
class BenchTarget:
    name: str
    # torch: build() -> (model, kernels); other backends: build(max_len, threads) -> (runner
    # with timed_generation, kernels)
    build: Callable[..., tuple[object, list[KernelChoice]]]
    size_bytes: int | None = None   # on disk, when the target is a saved folder
    details: dict = field(default_factory=dict)  # shown next to the figures (plan, source...)
    backend: str = "torch"
    model: nn.Module | None = None   # the model a torch target's build copies (memory guard)
    size_source: str = "disk"       # what size_bytes is: "disk" (a file) or "stored"
    size_breakdown: dict | None = None   # size as an export stores it, in parts
    native_step: bool = True   # decode through the native step where it can run the model


@dataclass
class BenchResult:
    name: str
    prefill_ms: float
    prefill_ms_range: tuple[float, float]
    decode_tok_s: float
    decode_tok_s_range: tuple[float, float]
    peak_rss_mb: float
    model_mb: float
    size_mb: float
    size_source: str              # "stored" (as an export stores it), "disk" or "memory"
    weights_read_mb: float        # weight bytes every decode step reads
    threads: int
    repeat: int
    prompt_tokens: int
    new_tokens: int
    kernels: list[KernelChoice]
    details: dict = field(default_factory=dict)
    backend: str = "torch"
    build: dict = field(default_factory=dict)   # versions / CPU flags of what ran it
    error: str | None = None                    # why an optional target gave no figures
    runtime_mb: float = 0.0                     # the target's tensors as they run
    size_breakdown: dict | None = None          # size_mb in parts (torch targets)

    @property
    def fallbacks(self) -> list[KernelChoice]:
        return [k for k in self.kernels if k.fallback]

    def to_dict(self) -> dict:
        if self.error:   # no figures: say what would have run and why it did not
            return {"name": self.name, "backend": self.backend, "error": self.error,
                    "threads": self.threads, "prompt_tokens": self.prompt_tokens,
                    "new_tokens": self.new_tokens, "kernel_summary": {}, "kernels": [],
                    "build": self.build, **self.details}
        return {"name": self.name, "prefill_ms": round(self.prefill_ms, 2),
                "prefill_ms_range": [round(v, 2) for v in self.prefill_ms_range],
                "decode_tok_s": round(self.decode_tok_s, 2),
                "decode_tok_s_range": [round(v, 2) for v in self.decode_tok_s_range],
                "peak_rss_mb": round(self.peak_rss_mb, 1), "model_mb": round(self.model_mb, 2),
                "size_mb": round(self.size_mb, 2), "size_source": self.size_source,
                "runtime_mb": round(self.runtime_mb, 1),
                **({"size_breakdown": self.size_breakdown} if self.size_breakdown else {}),
                "weights_read_mb": round(self.weights_read_mb, 2), "threads": self.threads,
                "repeat": self.repeat, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "kernel_summary": kernel_summary(self.kernels),
                "kernels": [k.to_dict() for k in self.kernels], "backend": self.backend,
                "build": self.build, **({"error": self.error} if self.error else {}),
                **self.details}


# --- what can be measured ------------------------------------------------------------------

def base_targets(model: nn.Module, configs=BASE_CONFIGS, group_size: int = 32,
                 lm_head: bool = True, size_bytes: int | None = None,
                 layer_names: list[str] | None = None, prefill: str = "dense",
                 kernels: str = "native") -> list[BenchTarget]:
    """fp32 / bf16 / int8 / int4 targets built from a float model.

    int8 is W8 per-channel symmetric, int4 is W4 asymmetric in groups of `group_size`, both
    round-to-nearest on `layer_names` (the quantizable block layers) and, when `lm_head`, on
    the output head too (the largest single matmul: in float it caps the speed-up). `prefill`
    and `kernels` (the studio's native low-bit kernels or torch's): see `kernels.kernel_model`.
    """
    refuse_streamed(model)
    unknown = [c for c in configs if c not in BASE_CONFIGS]
    if unknown:
        raise StudioError(f"Unknown benchmark configuration {', '.join(unknown)}; "
                          f"choose from {', '.join(BASE_CONFIGS)}.")
    names = list(layer_names if layer_names is not None else _block_linears(model))
    head = _head_name(model) if lm_head else None
    targets = []
    for config in configs:
        if config in ("fp32", "bf16"):
            # the native step reads float32 and bfloat16 weights too; torch's kernels: eager
            native = kernels == "native"
            dtype = torch.float32 if config == "fp32" else torch.bfloat16
            targets.append(BenchTarget(config if native else f"{config} (eager)",
                                       lambda dtype=dtype: float_model(model, dtype),
                                       size_bytes if config == "fp32" else None,
                                       model=model, native_step=native))
        if config in ("fp32", "bf16"):
            targets[-1].size_breakdown = planned_breakdown(model, {})
        else:
            spec = INT8_SPEC if config == "int8" else QuantSpec(bits=4, group_size=group_size)
            label = "int8" if config == "int8" else f"int4 g{group_size}"
            extra = " + lm_head" if head else ""
            suffix = "" if prefill == "dense" else f" ({prefill} prefill)"
            if kernels != "native":
                suffix += f" ({kernels} kernels)"
            targets.append(BenchTarget(
                f"{label}{extra}{suffix}", _rtn_builder(model, names, head, spec, prefill, kernels),
                details={"quantized": f"RTN W{spec.bits} "
                         f"{'per-channel' if spec.group_size == -1 else f'g{spec.group_size}'}"
                         f"{extra} (on the fly, for speed only)"}, model=model))
            # sized as a variant of the same plan would be
            targets[-1].size_breakdown = planned_breakdown(
                model, {name: spec for name in [*names, *([head] if head else [])]})
    return targets


def refuse_streamed(model: nn.Module) -> None:
    """Refused before any work: a model whose weights stay in their files (streamed).

    Timing it would time the disk and the bf16 -> float32 conversions (a decode step reads
    every layer again), not inference; and the kernels' builds pack every weight in memory
    at once, which is what streaming avoids. llama.cpp runs a GGUF export from its memory
    map instead, so the message points there."""
    from studio.core.streaming import streams

    if not streams(model):
        return
    need = 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    raise StudioError(
        f"Benchmarks time a model held in memory; this one keeps its weights in their files "
        f"(streamed), so its timings would be those of reading the files, and its kernels "
        f"would need about {need / 2**30:.1f} GiB at once. Export the variant as GGUF "
        f"(compression-studio export VARIANT --format gguf --out DIR) and time that file "
        f"with llama.cpp (compression-studio bench --backend llama.cpp --gguf DIR/FILE.gguf), "
        f"or open the model with --weights memory (File menu: uncheck 'Keep weights in "
        f"their files') if {need / 2**30:.1f} GiB fit.")


def variant_target(name: str, model: nn.Module, qtensors: dict, size_bytes: int | None = None,
                   details: dict | None = None, prefill: str = "dense",
                   kernels: str = "native") -> BenchTarget:
    """A quantized variant on its kernels (its de-quantized `model` and its `qtensors`); named
    for its int4 kernel when that is not the default one."""
    refuse_streamed(model)
    if kernels != "native":
        name += f" ({kernels} kernels)"
    return BenchTarget(name, lambda: kernel_model(model, qtensors, prefill, kernels), size_bytes,
                       {"prefill": prefill, "kernel_set": kernels, **(details or {})},
                       model=model, native_step=kernels == "native")


def variant_bench_target(variant, prefill: str = "dense", kernels: str = "native") -> BenchTarget:
    """`variant_target` for a Variant, sized as everywhere else: `Variant.size_bytes` (what an
    export stores, the embedding / lm_head included) with its breakdown, not its folder (codes
    in int32 words, fp32 scales, the base's tensors left out) nor its runtime tensors."""
    target = variant_target(variant.name, variant.model, variant.qtensors, None,
                            {"bits_per_weight": round(variant.bits_per_weight, 4),
                             "model_bits_per_weight": round(variant.model_bits_per_weight, 4),
                             "calibration": variant.calibration}, prefill, kernels)
    target.size_breakdown = variant.size_breakdown
    return target


def gguf_target(path, name: str | None = None, details: dict | None = None) -> BenchTarget:
    """A GGUF file run by llama.cpp (the optional backend)."""
    from pathlib import Path

    path = Path(path)

    def build(max_len: int, threads: int):
        from studio.core.export import llama_cpp

        reason = get_backend("llama.cpp").unavailable_reason()
        if reason:
            raise StudioError(reason[0].upper() + reason[1:] + ".")
        if not path.is_file():
            raise StudioError(f"{path} does not exist.")
        runner = llama_cpp.Generator(path, max_len, threads)
        return runner, gguf_kernels(path)

    from studio.core.gguf_parts import total_bytes

    size = total_bytes(path) if path.is_file() else None   # (every part of a split)
    return BenchTarget(name or gguf_label(path), build, size,
                       {"gguf": str(path), **(details or {})}, backend="llama.cpp")


def gguf_kernels(path) -> list[KernelChoice]:
    """What llama.cpp reads per token from a GGUF, one KernelChoice per weight tensor (the token
    embedding only when it is also the output head: otherwise one row of it is read)."""
    from studio.core.export import llama_cpp

    rows = llama_cpp.tensor_kernels(path)
    tied = not any(name == "output.weight" for name, *_ in rows)
    return [KernelChoice(name, f"llama.cpp {kind}", bits, size,
                         "the tied output head" if name == "token_embd.weight" else "")
            for name, kind, bits, size in rows
            if name != "token_embd.weight" or tied]


def _rtn_builder(model, names, head, spec, prefill="dense", kernels="native"):
    def build():
        qtensors = {}
        for name in names + ([head] if head else []):
            qtensors[name] = quantize_rtn(weight_matrix(model.get_submodule(name)), spec)
        return kernel_model(model, qtensors, prefill, kernels)
    return build


def _block_linears(model: nn.Module) -> list[str]:
    from studio.core.layers import inventory
    return [info.name for info in inventory(model) if info.quantizable and info.kind == "linear"]


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


# --- measuring -----------------------------------------------------------------------------

class RssPeak:
    """Samples this process's resident memory on a side thread (psutil has no portable peak)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def bench_job(targets: list[BenchTarget], vocab_size: int, prompt_tokens: int = 128,
              new_tokens: int = 64, repeat: int = 3, threads: int | None = None,
              seed: int = 0, compile: bool = False) -> Job[list[BenchResult]]:
    """Measure every target; returns one BenchResult each (nothing if cancelled).

    `compile`: Llama-family torch targets decode through a torch.compile'd step
    (`studio.core.compiled`), compiled before the warm-up as its own progress step; where it
    cannot compile, the eager step runs and the result says why."""
    if not targets:
        raise StudioError("There is nothing to benchmark.")
    if prompt_tokens < 1 or new_tokens < 1 or repeat < 1:
        raise StudioError("Prompt tokens, new tokens and repeats must all be at least 1.")
    guard(estimate_bench(targets, prompt_tokens + new_tokens))
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(seed))
    old_threads = torch.get_num_threads()
    steps = len(targets) * (repeat + 2)
    results: list[BenchResult] = []
    # Everything alive now is left out of the collections below: a full collection walks
    # every tracked object with the GIL held, 0.8 s in a process holding the demo (460 k
    # objects) and longer in the window, which waited for it. What the targets make is still
    # collected.
    with garbage.long_lived_frozen():
        try:
            if threads is not None:
                torch.set_num_threads(max(1, int(threads)))
            for index, target in enumerate(targets):
                base = index * (repeat + 2)
                yield Progress(base, steps, f"Building {target.name}")
                garbage.collect()        # the last target's model, its cycles included
                backend = get_backend(target.backend)
                if target.backend == "torch":
                    model, choices = target.build()
                else:
                    try:
                        model, choices = target.build(prompt_tokens + new_tokens + 1,
                                                      torch.get_num_threads())
                    except StudioError as exc:  # the torch figures still come out
                        results.append(_failed(target, str(exc), torch.get_num_threads(), repeat,
                                               prompt_tokens, new_tokens))
                        continue
                lean, step_mode = None, None
                if target.backend == "torch" and lean_supported(model):
                    lean = LeanRun(model, prompt_tokens + new_tokens, target.native_step)
                    step_mode = lean.mode
                    if compile:
                        yield Progress(base, steps, f"{target.name}: compiling the decode step "
                                                    f"(once per model and length)")
                        step_mode = lean.compile(prompt_tokens)
                elif target.backend == "torch":   # shown with the figures: why not the lean loop
                    step_mode = f"transformers' forward ({lean_problem(model)})"
                prefill, decode = [], []
                with RssPeak() as rss:
                    for run_index in range(repeat + 1):  # run 0 warms up and is not counted
                        what = "warm-up" if run_index == 0 else f"run {run_index}/{repeat}"
                        progress = Progress(base + 1 + run_index, steps, f"{target.name}: {what}")
                        yield progress
                        seconds_prefill, seconds_decode = yield from timed_generation(
                            model, prompt, new_tokens, progress, lean)
                        if run_index:
                            prefill.append(1000 * seconds_prefill)
                            decode.append(new_tokens / seconds_decode)
                # The size: a file's bytes when the target is one, else as an export stores it.
                stored = sum(target.size_breakdown.values()) if target.size_breakdown else None
                size = target.size_bytes if target.size_bytes is not None else stored
                source = (target.size_source if target.size_bytes is not None
                          else "stored" if stored is not None else "memory")
                in_memory = model_bytes(model) if isinstance(model, nn.Module) else size or 0
                loop = ("llama.cpp" if target.backend != "torch" else
                        "lean (q/k/v, gate/up fused where the layers allow)" if lean_supported(model) else "transformers")
                results.append(BenchResult(
                    name=target.name, prefill_ms=statistics.median(prefill),
                    prefill_ms_range=(min(prefill), max(prefill)),
                    decode_tok_s=statistics.median(decode), decode_tok_s_range=(min(decode), max(decode)),
                    # a llama.cpp runner reports its own process's peak
                    peak_rss_mb=(getattr(model, "peak_rss", 0) or rss.peak) / 2**20,
                    model_mb=(size if size is not None else in_memory) / 2**20,
                    size_mb=(size if size is not None else in_memory) / 2**20,
                    size_source=source, runtime_mb=in_memory / 2**20,
                    size_breakdown=target.size_breakdown,
                    weights_read_mb=sum(c.weight_bytes for c in choices) / 2**20,
                    threads=torch.get_num_threads(), repeat=repeat, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, kernels=choices,
                    details={"decode_loop": loop, **target.details,
                             **({"decode_step": step_mode} if step_mode else {})},
                    backend=target.backend,
                    build={**backend.build_info(), "threads": torch.get_num_threads()}))
                del model, lean
            yield Progress(steps, steps, "Benchmark done")
        finally:
            torch.set_num_threads(old_threads)
    return results


def _failed(target: BenchTarget, error: str, threads: int, repeat: int, prompt_tokens: int,
            new_tokens: int) -> BenchResult:
    nan = math.nan
    return BenchResult(target.name, nan, (nan, nan), nan, (nan, nan), nan, nan,
                       (target.size_bytes or 0) / 2**20, "disk", 0.0, threads, repeat,
                       prompt_tokens, new_tokens, [], dict(target.details), target.backend,
                       {"backend": target.backend}, error)


def timed_generation(model, prompt: torch.Tensor, new_tokens: int, progress: Progress,
                     lean: "LeanRun | None" = None):
    """(prefill seconds, decode seconds) of greedy generation; yields between decode chunks.

    A runner of another backend times itself; Llama-family models run the lean loop below
    (`lean`: its decoder and step, made once per target); others the transformers forward
    with its cache.
    """
    if hasattr(model, "timed_generation"):
        return (yield from model.timed_generation(prompt, new_tokens, progress))
    if lean_supported(model):
        lean = lean or LeanRun(model, prompt.shape[1] + new_tokens)
        return (yield from _timed_lean(lean, prompt, new_tokens, progress))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        token = greedy(out.logits[:, -1])
        decode = 0.0
        for step in range(new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = greedy(out.logits[:, -1])
            decode += time.perf_counter() - start
            if step % 16 == 15:
                yield progress  # lets a cancel land mid-run; the timing excludes it
    return prefill, decode


class LeanRun:
    """A target's lean decoder (fused q/k/v and gate/up; its static KV cache reused by every
    run: prefill rewrites the prompt's positions, later ones are never read) and its step:
    the native step where it can run the model and `native`, else the eager one."""

    def __init__(self, model: nn.Module, max_len: int, native: bool = True) -> None:
        from studio.core.native_step import NativeStep
        from studio.core.q4_native import NativeLinear

        self.decoder = LeanDecoder(model, max_len, fused=True)
        self.step, self.mode = self.decoder.forward, "eager"
        problem = NativeStep.problem(self.decoder) if native else "torch's kernels chosen"
        if problem is None:
            self.step, self.mode = NativeStep(self.decoder), NativeStep.mode
        elif any(isinstance(m, NativeLinear) for m in model.modules()):
            self.mode = f"eager (not the native step: {problem})"

    def compile(self, position: int) -> str:
        """Compile the step (its first call) at `position`; the mode it ended in. The native
        step is already one call per token: it is kept, not compiled."""
        from studio.core.compiled import CompiledStep

        if self.mode == getattr(self.step, "mode", None):
            return f"{self.mode}; not compiled (no torch ops left to fuse)"
        step = CompiledStep(self.decoder)
        with torch.inference_mode():
            step(torch.zeros(1, 1, dtype=torch.long), position)
        self.step = step
        return step.mode


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The next token [1, 1] of greedy decoding from the last position's logits [1, vocab]:
    numpy's argmax where it can read them (float32), every target alike. Torch's takes 0.7 ms
    on a 262k-token row on one thread, 17x numpy's, and it is paid on every token."""
    if logits.dtype == torch.float32:
        return torch.tensor([[int(np.argmax(logits.reshape(-1).numpy()))]])
    return logits.reshape(1, -1).argmax(-1, keepdim=True)


def _timed_lean(lean: LeanRun, prompt: torch.Tensor, new_tokens: int, progress: Progress):
    with torch.inference_mode():
        decoder, next_logits = lean.decoder, lean.step
        start = time.perf_counter()
        logits = decoder.forward(prompt, 0)
        prefill = time.perf_counter() - start
        token = greedy(logits)
        position = prompt.shape[1]
        decode = 0.0
        for step in range(new_tokens):
            start = time.perf_counter()
            token = greedy(next_logits(token, position))
            position += 1
            decode += time.perf_counter() - start
            if step % 16 == 15:
                yield progress
    return prefill, decode
