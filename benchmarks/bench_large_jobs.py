"""The jobs bench_large.py runs, one per child process (see bench_large.py).

Each returns a dict: the job's seconds, the memory guard's estimate, the RSS after opening,
seconds per decoder block where the job has blocks, and its quality figures (perplexity) so a
run of the demo can be compared to the digit with an earlier one.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import psutil
import torch

MIB = 2 ** 20
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = Path(os.environ.get("STUDIO_LARGE_VARIANTS", "/work/tmp_large/variants"))


def _settings(name: str, default: str) -> tuple[int, int]:
    """(windows, tokens per window) from $NAME ("16x512"): the guard table runs smaller."""
    windows, seqlen = os.environ.get(name, default).lower().split("x")
    return int(windows), int(seqlen)


EVAL_WINDOWS, EVAL_SEQLEN = _settings("STUDIO_LARGE_EVAL", "4x512")
CALIB_WINDOWS, SEQLEN = _settings("STUDIO_LARGE_CALIB", "16x512")


def run_child(job: str, model: str) -> dict:
    import resource

    record = _run_child(job, model)
    # this process's own peak (the parent's RUSAGE_CHILDREN is the largest of all its children)
    record["peak_rss_self_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        * 1024 / MIB)
    # the largest process this one waited for (an export's llama.cpp worker)
    record["peak_rss_grandchildren_mib"] = round(resource.getrusage(
        resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MIB)
    return record


def _run_child(job: str, model: str) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from studio.core import memory
    from studio.core.jobs import run
    from studio.core.models import open_model_job

    import transformers.models.llama.modeling_llama  # noqa: F401  (library import: runtime)

    record: dict = {}
    made = []   # the estimate the open itself guards with (before any weight is read)
    estimate_open = memory.estimate_open
    memory.estimate_open = lambda *a, **k: made.append(estimate_open(*a, **k)) or made[-1]
    converts = []   # a GGUF's first open: the guard's estimate of its de-quantization
    estimate_convert = memory.estimate_convert
    memory.estimate_convert = lambda *a, **k: converts.append(
        estimate_convert(*a, **k)) or converts[-1]
    start = time.perf_counter()
    handle = run(open_model_job(model))
    memory.estimate_open = estimate_open
    memory.estimate_convert = estimate_convert
    if converts:
        record["convert_estimate_mib"] = round(converts[-1].total / MIB)
        record["convert_estimate_added_mib"] = round(converts[-1].added / MIB)
        record["convert_estimate"] = converts[-1].describe()
    record["open_seconds"] = round(time.perf_counter() - start, 2)
    record["rss_after_open_mib"] = round(psutil.Process().memory_info().rss / MIB)
    record["streamed"] = handle.streamed
    if job == "open":
        if not handle.streamed:   # held weights are paged in on first use: touch them all
            for tensor in handle.model.parameters():
                tensor.sum()
            record["rss_after_touching_mib"] = round(psutil.Process().memory_info().rss / MIB)
        if made:   # (a GGUF's first open in memory is guarded by its convert estimate)
            record["estimate_mib"] = round(made[-1].total / MIB)
        if handle.streamed:   # what the guard checks when opening a streamed model
            record["note"] = ("estimate: the smallest job (one block and the largest layer in "
                              "float32), not the open itself")
        return record
    runner = {"stats": _stats, "rtn": _quantize, "rtn-noerr": _quantize, "gptq": _quantize,
              "eval": _eval, "eval-variant": _eval_variant, "capture": _capture,
              "sensitivity": _sensitivity, "bench": _bench, "export": _export}[job]
    record.update(runner(job, handle, model))
    return record


def _timed(job, guard_estimate) -> tuple[object, dict]:
    """Run a job; seconds per block from its progress messages ('block N' / 'layers.N.')."""
    from studio.core.jobs import run

    marks: dict[int, float] = {}
    start = time.perf_counter()

    trace = os.environ.get("STUDIO_LARGE_TRACE")   # a run cut short still leaves its curve

    def seen(p):
        found = re.search(r"block (\d+)|layers\.(\d+)\.", p.message)
        if found:
            index = int(found.group(1) or found.group(2))
            if index not in marks and trace:
                with open(trace, "a") as f:
                    f.write(json.dumps({"block": index, "t": round(time.perf_counter() - start, 1),
                                        "rss_mib": round(psutil.Process().memory_info().rss
                                                         / MIB)}) + "\n")
            marks.setdefault(index, time.perf_counter())

    result = run(job, seen)
    total = time.perf_counter() - start
    ordered = [marks[i] for i in sorted(marks)] + [start + total]
    per_block = [round(b - a, 2) for a, b in zip(ordered, ordered[1:])]
    return result, {"seconds": round(total, 1), "estimate_mib": round(guard_estimate / MIB),
                    "per_block_seconds": per_block}


def _stats(job, handle, model) -> dict:
    from studio.core import memory
    from studio.core.stats import weight_stats_job

    estimate = memory.estimate_job(handle, "stats").total
    _, record = _timed(weight_stats_job(handle), estimate)
    return record


def _plan(job):
    from studio.core.plan import Plan, QuantSpec
    return Plan(QuantSpec(4, 128, False, job.split("-")[0]))


def _quantize(job, handle, model) -> dict:
    from studio.core import memory
    from studio.core.quantize import quantize_text_job
    from studio.core.variant import save_variant

    from studio.core.quantize import quantize_job

    method = job.split("-")[0]
    if job == "rtn-noerr":   # no text at all: RTN itself, without its error figures' forwards
        estimate = memory.estimate_job(handle, "quantize", method=method, windows=0,
                                       seqlen=SEQLEN).total
        made = quantize_job(handle, _plan(job), None, None, job)
    else:
        estimate = memory.estimate_job(handle, "quantize", method=method,
                                       windows=CALIB_WINDOWS, seqlen=SEQLEN).total
        made = quantize_text_job(handle, _plan(job), DATA / "tinyshakespeare.txt",
                                 CALIB_WINDOWS, SEQLEN, 0, job)
    variant, record = _timed(made, estimate)
    # ($STUDIO_LARGE_SAVE_TO: elsewhere than the variants the other jobs read, e.g. the
    # guard table's small-settings runs)
    save_variant(variant, Path(os.environ.get("STUDIO_LARGE_SAVE_TO", VARIANTS))
                 / f"{Path(model).name}-{job}")
    record["bits_per_weight"] = round(variant.bits_per_weight, 3)
    return record


def _eval(job, handle, model) -> dict:
    from studio.core import memory
    from studio.core.evaluate import evaluate_job

    estimate = memory.estimate_job(handle, "eval", windows=1, seqlen=EVAL_SEQLEN).total
    result, record = _timed(evaluate_job(handle.model, None, handle.tokenizer,
                                         DATA / "wikitext2_test.txt", EVAL_SEQLEN, EVAL_WINDOWS),
                            estimate)
    record["ppl"] = result.ppl
    return record


def _eval_variant(job, handle, model) -> dict:
    from studio.core import memory
    from studio.core.evaluate import evaluate_job
    from studio.core.variant import load_variant

    method = os.environ.get("STUDIO_LARGE_VARIANT", "gptq")
    variant = load_variant(VARIANTS / f"{Path(model).name}-{method}", handle)
    estimate = memory.estimate_job(variant.model, "eval", windows=1, seqlen=EVAL_SEQLEN,
                                   variant=True, beside=[handle.model]).total
    result, record = _timed(evaluate_job(variant.model, handle.model, handle.tokenizer,
                                         DATA / "wikitext2_test.txt", EVAL_SEQLEN,
                                         EVAL_WINDOWS),
                            estimate)
    record.update(ppl=result.ppl, base_ppl=result.base_ppl, kl=result.kl, variant=method)
    return record


def _capture(job, handle, model) -> dict:
    from studio.core import memory
    from studio.core.activations import DEFAULT_SEQLEN, DEFAULT_WINDOWS, activation_capture_job

    estimate = memory.estimate_job(handle, "capture", windows=DEFAULT_WINDOWS,
                                   seqlen=DEFAULT_SEQLEN).total
    _, record = _timed(activation_capture_job(handle, DATA / "tinyshakespeare.txt"), estimate)
    return record


def _sensitivity(job, handle, model) -> dict:
    """The sweep with the CLI's defaults (proxy on 8 windows, KL on 8 x 512)."""
    from studio.core import memory
    from studio.core.sensitivity import (DEFAULT_KL_WINDOWS, DEFAULT_PROXY_TOKENS,
                                         DEFAULT_PROXY_WINDOWS, sensitivity_job)
    from studio.core.text import text_windows

    windows, label = text_windows(handle.tokenizer, DATA / "tinyshakespeare.txt", SEQLEN,
                                  max(DEFAULT_KL_WINDOWS, DEFAULT_PROXY_WINDOWS), 0)
    estimate = memory.estimate_job(handle, "sensitivity", windows=DEFAULT_KL_WINDOWS,
                                   seqlen=SEQLEN, proxy_windows=DEFAULT_PROXY_WINDOWS,
                                   proxy_tokens=DEFAULT_PROXY_TOKENS).total
    _, record = _timed(sensitivity_job(handle, windows, kl_bits=(4,), text_label=label),
                       estimate)
    return record


def _bench(job, handle, model) -> dict:
    """The CLI's default torch targets and lengths, one timed run each (the memory is the
    figure here, not the speed)."""
    from studio.core import memory
    from studio.core.bench import BASE_CONFIGS, base_targets, bench_job

    targets = base_targets(handle.model, BASE_CONFIGS,
                           layer_names=[layer.name for layer in handle.quantizable])
    estimate = memory.estimate_bench(targets, 128 + 64).total
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    _, record = _timed(bench_job(targets, vocab, 128, 64, repeat=1), estimate)
    return record


def _export(job, handle, model) -> dict:
    """The variant `STUDIO_LARGE_VARIANT` (default gptq) exported as `STUDIO_LARGE_FORMAT`
    (default gguf) into a scratch folder, verified as the CLI does, in shards of
    `STUDIO_LARGE_SHARD` (default 5GB; safetensors formats)."""
    import shutil
    import tempfile

    from studio.core import memory
    from studio.core.export import get_format
    from studio.core.export.base import ExportOptions
    from studio.core.export.job import export_job
    from studio.core.export.shards import parse_size
    from studio.core.variant import load_variant

    method = os.environ.get("STUDIO_LARGE_VARIANT", "gptq")
    fmt = os.environ.get("STUDIO_LARGE_FORMAT", "gguf")
    variant = load_variant(VARIANTS / f"{Path(model).name}-{method}", handle)
    from studio.core.export.job import VERIFY_SEQLEN, VERIFY_WINDOWS

    options = ExportOptions(shard_size=parse_size(os.environ.get("STUDIO_LARGE_SHARD", "5GB")))
    fmt_ = get_format(fmt)
    runtime = fmt_.runtime_bytes(variant, handle, options,
                                 fmt_.preflight(variant, handle, options))
    # as export_job asks; the consumer's own process (llama.cpp) is compared apart
    estimate = memory.estimate_job(variant.model, "export", windows=1,
                                   seqlen=VERIFY_WINDOWS * VERIFY_SEQLEN, runtime=runtime,
                                   extra=fmt_.studio_bytes(variant, handle)).total - runtime
    scratch = Path(tempfile.mkdtemp(prefix="bench-export-"))
    sampler = _ChildrenPeak()
    try:
        result, record = _timed(export_job(variant, handle, fmt, scratch / "out", options),
                                estimate)
        record["consumer_peak_mib"] = round(sampler.stop() / MIB)
        record.update(format=fmt, variant=method, bytes=result.bytes,
                      runtime_estimate_mib=round(runtime / MIB),
                      shard_size=options.shard_size,
                      files=sorted(f.name for f in (scratch / "out").iterdir()))
    finally:
        sampler.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return record


class _ChildrenPeak:
    """The largest RSS llama.cpp's worker process reaches, sampled every 20 ms. Neither
    getrusage nor sampling every child tells it: a child's ru_maxrss starts at its parent's
    high-water (exec keeps the old memory's peak), and a child caught between fork and exec
    shows the parent's pages; so only a process already running llama_worker.py counts."""

    def __init__(self) -> None:
        import threading

        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.02):
            for child in me.children(recursive=True):
                try:
                    if any("llama_worker" in part for part in child.cmdline()):
                        self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak
