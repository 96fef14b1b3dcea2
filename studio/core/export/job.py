"""The export job: check, write into a temporary folder, re-open with the consumer's library,
verify against the variant, then rename into place. Any format, from the CLI or the window.

Never half-written: everything goes into a hidden temporary folder beside the target, which
replaces the target in one rename only after verification passed (`files.atomic_dir`). A cancel,
a full disk, a failed verification or a kill leaves the target as it was; a kill's leftover
temporary is removed by the next export to the same place.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from studio import __version__
from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.export import get_format
from studio.core.export.base import ExportOptions, Reloaded, Written
from studio.core.export.report import readme_text
from studio.core.export.tensors import float_tensors
from studio.core import files
from studio.core.files import atomic_dir
from studio.core.jobs import Job, Progress
from studio.core.layers import get_module, is_linear, weight_matrix
from studio.core.memory import guard_job

VERIFY_WINDOWS = 2
VERIFY_SEQLEN = 64
# Bound on the relative (squared) error of a float tensor rounded once to each type.
ROUNDING_BOUND = {"f32": 0.0, "f16": 1e-6, "bf16": 1e-4}
EXACT_TOLERANCE = 1e-6   # exact layers: max |difference| / max |weight| (float op order only)
# Logits may move by float rounding (f16 tensors, a consumer's activation quantization); a
# model the consumer rebuilt differently moves them by about their own size.
LOGIT_TOLERANCE = 0.1    # max |logit difference| / max |logit|


@dataclass
class Verification:
    ok: bool
    max_weight_diff: float          # max |reloaded - variant| over the quantized layers
    max_float_diff: float           # the same over every other float tensor
    max_logit_diff: float
    top1_agreement: float
    tokenizer_equal: bool | None
    tokenizer_detail: str
    logits_by: str = ""             # what computed the file's logits ("": the consumer's model)
    layers: list[dict] = field(default_factory=list)   # per quantized layer: stored_as, diffs
    failures: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    path: str                       # the export folder
    file: str                       # what a consumer opens (the .gguf, or the folder)
    format: str
    bytes: int                      # the model files' size on disk
    bits_per_weight_on_disk: float
    bits_per_weight_estimate: float  # the variant's own estimate (the plan editor's figure)
    seconds: float
    verified: bool
    max_weight_diff: float          # quantized layers
    max_float_diff: float           # every other float tensor (one rounding to the float type)
    max_logit_diff: float
    tokenizer_equal: bool | None
    options: dict
    layers: list[dict]
    notes: list[str]
    evaluation: dict | None = None
    logits_by: str = ""             # set when the file's own runtime computed its logits

    def to_dict(self) -> dict:
        return asdict(self)


def export_job(variant, handle, format_name: str, out: str | Path,
               options: ExportOptions | None = None, force: bool = False,
               metrics_known: dict | None = None, eval_windows: torch.Tensor | None = None,
               eval_protocol: str | None = None) -> Job[ExportResult]:
    """Export `variant` (made from `handle`'s model) as `format_name` into the folder `out`.

    `metrics_known`: figures measured for this variant (with their protocol), copied into the
    report. `eval_windows`: when given, the reloaded export's perplexity and the variant's are
    measured on them (the protocol named by `eval_protocol`) and compared."""
    from studio.core.models import quiet_transformers

    quiet_transformers()
    options = options or ExportOptions()
    fmt = get_format(format_name)
    out = Path(out).expanduser()
    check_destination(out, force)
    check_variant_matches(variant, handle)
    preflight = fmt.preflight(variant, handle, options)
    if preflight.problems:
        raise StudioError(f"{fmt.title} cannot hold this variant as asked: "
                          + " ".join(preflight.problems))
    # (the logits compared: the verification's windows, then one evaluation window at a time)
    tokens = VERIFY_WINDOWS * VERIFY_SEQLEN
    if eval_windows is not None:
        tokens = max(tokens, eval_windows.shape[1])
    guard_job(variant.model, "export", windows=1, seqlen=tokens,
              runtime=fmt.runtime_bytes(variant, handle, options, preflight),
              extra=fmt.studio_bytes(variant, handle))
    remove_stale_temporaries(out)
    started = time.perf_counter()
    try:
        with atomic_dir(out) as tmp:
            written: Written = yield from fmt.write_job(variant, handle, options, preflight, tmp)
            (tmp / "recipe.json").write_text(json.dumps(recipe(variant), indent=2))
            reloaded: Reloaded = yield from fmt.reload_job(written, handle)
            verification = yield from verify_job(variant, handle, reloaded, preflight, options)
            if not verification.ok:
                raise StudioError("The export did not verify, so nothing was written: "
                                  + " ".join(verification.failures[:3]))
            seconds = time.perf_counter() - started  # the export itself, not the evaluation
            evaluation = None
            if eval_windows is not None:
                evaluation = yield from compare_perplexity_job(variant, reloaded,
                                                               eval_windows, eval_protocol)
            del reloaded
            result = ExportResult(
                path=str(out), file=str(out / written.file.relative_to(tmp))
                if written.file != tmp else str(out),
                format=fmt.name, bytes=model_bytes_on_disk(tmp),
                bits_per_weight_on_disk=round(bits_on_disk(variant, written, options), 4),
                bits_per_weight_estimate=round(variant.bits_per_weight, 4),
                seconds=round(seconds, 2), verified=verification.ok,
                max_weight_diff=verification.max_weight_diff,
                max_float_diff=verification.max_float_diff,
                max_logit_diff=verification.max_logit_diff,
                tokenizer_equal=verification.tokenizer_equal, options=options.to_dict(),
                logits_by=verification.logits_by,
                layers=verification.layers, notes=preflight.notes + written.notes,
                evaluation=evaluation)
            report = {**result.to_dict(), "studio_version": __version__,
                      "variant": variant.to_summary(), "metrics": metrics_known,
                      "tokenizer_detail": verification.tokenizer_detail,
                      "logits_by": verification.logits_by or fmt.consumer,
                      "top1_agreement": verification.top1_agreement}
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
            (tmp / "README.md").write_text(readme_text(fmt, variant, report))
            yield Progress(1, 1, f"Verified; moving into {out}")
    except OSError as exc:
        raise StudioError(f"Could not write {out}: {exc.strerror or exc}. "
                          f"Nothing was changed there.") from None
    return result


# --- checks before any work ------------------------------------------------------------------

def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise StudioError(f"{out} already exists; choose another place, or replace it "
                          f"(--force).")
    if out.exists() and not out.is_dir():
        raise StudioError(f"{out} is a file; an export is a folder.")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StudioError(f"Cannot write in {parent}: permission denied.")


def check_variant_matches(variant, handle) -> None:
    if variant.architecture != handle.architecture:
        raise StudioError(f"The variant was made from a {variant.architecture}, but the model "
                          f"open is a {handle.architecture}.")
    for name, qt in variant.qtensors.items():
        try:
            shape = tuple(weight_matrix(get_module(handle.model, name)).shape)
        except AttributeError:
            raise StudioError(f"The variant quantizes {name}, which this model does not "
                              f"have: it was made from another model.") from None
        if shape != tuple(qt.shape):
            raise StudioError(f"The variant's {name} is {list(qt.shape)}, the model's is "
                              f"{list(shape)}: it was made from another model.")


def remove_stale_temporaries(out: Path) -> None:
    """Leftovers of an export that was killed half-way (`files.remove_stale_temporaries`:
    those of writers that are gone, never a running export's)."""
    files.remove_stale_temporaries(out)


# --- verification ----------------------------------------------------------------------------

def verify_job(variant, handle, reloaded: Reloaded, preflight, options: ExportOptions
               ) -> Job[Verification]:
    """Compare the reloaded export with the variant: every quantized layer's weights (exact where
    the preflight said exact, within its measured error otherwise), every other float tensor
    (within one rounding to the chosen type), and logits on a few windows."""
    targets = {t.name: t for t in preflight.targets}
    model = reloaded.model
    failures, layers, max_diff = [], [], 0.0
    names = list(variant.qtensors)
    for i, name in enumerate(names):
        if i % 16 == 0:
            yield Progress(i, len(names) + 2, f"Comparing weights: {name}")
        expected = variant.qtensors[name].dequantize()
        got = (reloaded.weights or {}).get(name)
        got = _reloaded_weight(model, name) if got is None else got
        if got is None or tuple(got.shape) != tuple(expected.shape):
            failures.append(f"{name} is missing or has another shape in the reloaded file.")
            continue
        diff = (got.float() - expected).abs().max().item()
        rel = metrics.relative_error(expected, got)
        target = targets.get(name)
        exact = target is None or target.exact
        bound = EXACT_TOLERANCE * expected.abs().max().item()
        ok = diff <= bound if exact else rel <= 1.5 * (target.error or 0.0) + 1e-12
        if not ok:
            failures.append(f"{name}: weights differ by {diff:.3g} (relative {rel:.3g}) from "
                            f"the variant's.")
        max_diff = max(max_diff, diff)
        layers.append({"name": name, "stored_as": target.stored_as if target else "",
                       "exact": exact, "max_weight_diff": diff, "relative_error": rel})
    yield Progress(len(names), len(names) + 2, "Comparing the other tensors")
    float_diff = _compare_floats(variant, reloaded, options.dtype, failures)
    yield Progress(len(names) + 1, len(names) + 2, "Comparing logits")
    logit_diff, top1, scale = logits_agreement(variant.model, model, verify_windows(handle),
                                               reloaded.logits)
    if not math.isfinite(logit_diff):
        failures.append("The reloaded model's logits are not finite.")
    elif logit_diff > LOGIT_TOLERANCE * scale:
        # Equal weights but other logits: the consumer rebuilt the model differently (a config
        # key it does not read, another rotary layout...).
        failures.append(f"The reloaded model's logits differ from the variant's by up to "
                        f"{logit_diff:.3g} (its largest logit is {scale:.3g}): the file does "
                        f"not compute what the variant does.")
    if reloaded.tokenizer_equal is False:
        failures.append(f"The tokenizer {reloaded.tokenizer_detail}.")
    return Verification(ok=not failures, max_weight_diff=max_diff, max_float_diff=float_diff,
                        max_logit_diff=logit_diff,
                        top1_agreement=top1, tokenizer_equal=reloaded.tokenizer_equal,
                        tokenizer_detail=reloaded.tokenizer_detail,
                        logits_by=reloaded.logits_by, layers=layers,
                        failures=failures)


def _reloaded_weight(model, name: str) -> torch.Tensor | None:
    try:
        module = get_module(model, name)
    except AttributeError:
        return None
    if is_linear(module):
        return weight_matrix(module)
    weight = getattr(module, "weight", None)  # an embedding
    return weight.data if isinstance(weight, torch.Tensor) else None


def _compare_floats(variant, reloaded: Reloaded, dtype: str, failures: list[str]) -> float:
    """Tensors the variant keeps as floats, against the reloaded model's of the same name,
    one at a time (a streamed variant's and a streamed re-open's are read as they come).
    A tied tensor the file holds once (a GGUF's token_embd as the head) is compared once."""
    floats = (reloaded.floats if reloaded.floats is not None
              else reloaded.model.state_dict())
    worst, compared = 0.0, set()
    for key, value in float_tensors(variant, lazy=True).items():
        if not value.is_floating_point():
            continue
        identity = _identity(value)
        if key not in floats:
            if identity not in compared:
                failures.append(f"{key} is missing from the reloaded model.")
            continue
        got = floats[key]
        if got.shape != value.shape:
            failures.append(f"{key} is {list(got.shape)} in the reloaded file, "
                            f"{list(value.shape)} in the variant.")
            continue
        rel, diff = float_difference(value, got)
        if rel > ROUNDING_BOUND[dtype] + 1e-12 and rel > 1e-10:
            failures.append(f"{key} differs from the variant's by {rel:.3g} (relative), more "
                            f"than one rounding to {dtype}.")
        worst = max(worst, diff)
        compared.add(identity)
    return worst


def _identity(tensor: torch.Tensor) -> tuple:
    """What tied tensors share: the parameter object of a streamed one, else the storage."""
    from studio.core.streaming import StoredParameter

    if isinstance(tensor, StoredParameter):
        return ("stored", id(tensor))
    return (tensor.data_ptr(), tuple(tensor.shape))


COMPARE_CHUNK = 1 << 22   # elements compared at a time


def float_difference(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(relative squared error as metrics.relative_error, max |difference|), a chunk at a
    time, a streamed tensor read a chunk at a time from its file: a 128256 x 3072 embedding
    compared at once would take four float32 copies (6 GiB)."""
    error = norm = worst = 0.0
    for start in range(0, reference.numel(), COMPARE_CHUNK):
        x = _chunk(reference, start).float()
        d = _chunk(other, start).float() - x
        error += d.pow(2).sum().item()
        norm += x.pow(2).sum().item()
        worst = max(worst, d.abs().max().item())
    return error / max(norm, 1e-30), worst


def _chunk(tensor: torch.Tensor, start: int) -> torch.Tensor:
    from studio.core.streaming import StoredParameter

    if isinstance(tensor, StoredParameter):
        return tensor.store.read_flat(tensor.key, start, COMPARE_CHUNK)
    return tensor.reshape(-1)[start: start + COMPARE_CHUNK]


def verify_windows(handle) -> torch.Tensor:
    """A few short windows: real text when the model has a tokenizer, else seeded token ids."""
    from studio.core.text import builtin_text, calibration_windows, tokenize

    if handle.tokenizer is not None:
        ids = tokenize(handle.tokenizer, builtin_text()[:20_000])
        if ids.numel() >= VERIFY_SEQLEN:
            return calibration_windows(ids, VERIFY_SEQLEN, VERIFY_WINDOWS, seed=0)
    vocab = handle.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (VERIFY_WINDOWS, VERIFY_SEQLEN), generator=generator)


def logits_agreement(reference, model, windows: torch.Tensor, logits=None
                     ) -> tuple[float, float, float]:
    """(max |logit difference|, top-1 agreement, max |reference logit|) of two models on
    `windows` (the second's logits from `logits(windows)` when given: the file's own runtime)."""
    from studio.core.quant.coded import expanded

    with expanded(reference), torch.inference_mode():
        ref = reference(input_ids=windows, use_cache=False).logits.float()
        got = (model(input_ids=windows, use_cache=False).logits if logits is None
               else logits(windows)).float()
    return ((got - ref).abs().max().item(), metrics.top1_agreement(ref, got).mean().item(),
            ref.abs().max().item())


def compare_perplexity_job(variant, reloaded: Reloaded, windows: torch.Tensor,
                           protocol: str | None) -> Job[dict]:
    """Perplexity of the reloaded export and of the variant on the same windows (the export's
    from its runtime's own job where only that runs the file: a streamed GGUF's llama.cpp)."""
    from studio.core.evaluate import perplexity

    started = time.perf_counter()
    yield Progress(0, 2, f"Perplexity of the reloaded export ({windows.shape[0]} windows)")
    if reloaded.model is None:
        exported, tokens = yield from reloaded.extra["perplexity_job"](windows)
    else:
        exported, tokens = perplexity(reloaded.model, windows)
    yield Progress(1, 2, f"Perplexity of the variant ({windows.shape[0]} windows)")
    studio, _ = perplexity(variant.model, windows)
    return {"protocol": protocol, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "tokens": tokens,
            "ppl_export": exported, "ppl_variant": studio,
            "ppl_ratio": exported / studio, "seconds": round(time.perf_counter() - started, 2)}


# --- sizes -----------------------------------------------------------------------------------

MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".model", ".txt", ".jinja")
NOT_MODEL_FILES = ("recipe.json", "report.json")


def model_bytes_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES and f.name not in NOT_MODEL_FILES)


def bits_on_disk(variant, written: Written, options: ExportOptions) -> float:
    """Bits per weight as stored, over the layers `variant.bits_per_weight` counts (quantized
    layers at their bytes in the file, other block linears at the float type's size)."""
    from studio.core.variant import _in_block

    float_bits = 32 if options.dtype == "f32" else 16
    bits = total = 0.0
    for name, module in variant.model.named_modules():
        if name in variant.qtensors:
            numel = variant.qtensors[name].numel()
            bits += 8 * written.layer_bytes.get(name, 0)
            total += numel
        elif is_linear(module) and _in_block(name):
            numel = weight_matrix(module).numel()
            bits += float_bits * numel
            total += numel
    return bits / total if total else float(float_bits)


def recipe(variant) -> dict:
    """recipe.json beside every export: the plan, the methods' options, calibration, version."""
    return {"studio_version": __version__, "variant": variant.name,
            "base": variant.base_source, "architecture": variant.architecture,
            "calibration": variant.calibration, "act_bits": variant.act_bits,
            "plan": variant.plan.to_json(),
            "layers": {name: spec.to_dict() for name, spec in variant.specs.items()}}
