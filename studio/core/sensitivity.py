"""How much each layer suffers under each quantization option, one layer at a time.

The options are a menu of RTN grids: every width in `bits` at every group size in
`group_sizes` (W4 g128, W3 g64, ...), or the GGUF-native menu (`sweep_options.py`: Q4_0,
Q5_0, Q8_0 as the studio grids they are, with fp16 scales). For every quantizable layer, only
that layer is quantized and two things are measured:

- the fast proxy, at every option: the relative error (and SQNR) of the layer's own output on
  captured calibration inputs, ||X (Wq - W)^T||^2 / ||X W^T||^2;
- the end-to-end effect, at a few reference options only (default W4 g128): KL divergence of the
  next-token distribution against the baseline and the perplexity on evaluation windows.

Every other option's end-to-end loss is predicted from the proxy. For a small perturbation the
KL divergence is second order in the change of the layer's output, and the proxy is that change
squared (relative), so KL_l(option) ~ c_l x proxy_l(option) with c_l, the layer's KL per unit of
output error, read off the measured option: c_l = KL_l(ref) / proxy_l(ref). In issue 5's
experiment on the demo model this beat both the proxy alone and measured KL over g128 widths
only (docs/ARCHITECTURE.md), and it needs one end-to-end run per layer instead of three.

The end-to-end sweep is made affordable by caching the baseline once: the input of every
decoder block and the final log-probabilities. A layer in block i then only needs blocks
i..end re-run (a copy of block i carrying the quantized weight, then the untouched blocks),
so the user's model is never modified, not even for a moment.

The model's ends (lm_head, embedding) are measured too: `sensitivity_ends`.

Results carry the identity of the model they were measured on (architecture, layer names and a
weight fingerprint); using them with another model is refused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK
from studio.core.files import read_json, write_text_atomic
from studio.core.jobs import Job, Progress
from studio.core.layers import set_weight_matrix, weight_matrix
from studio.core.memory import guard_job
from studio.core.streaming import materialise
from studio.core.plan import QuantSpec
from studio.core.quant.blocks import call_block, capture_block_inputs, decoder_blocks
from studio.core.quant.registry import REFERENCE
from studio.core.quant.rtn import quantized_values
from studio.core.metrics import output_error
from studio.core.sensitivity_ends import end_logits, end_proxy, end_shape, measured_ends
from studio.core.sweep_options import (DEFAULT_BITS, DEFAULT_GROUPS,  # noqa: F401 (re-exported)
                                       DEFAULT_KL_BITS, DEFAULT_KL_GROUP, gguf_native_options,
                                       kl_columns, option_label, parse_group_sizes,
                                       parse_widths, same_grid, sweep_options)

DEFAULT_SEQLEN = 32        # KL window length: kept the demo's old 3-width sweep under 10 min
DEFAULT_KL_WINDOWS = 8
DEFAULT_PROXY_TOKENS = 512
DEFAULT_PROXY_WINDOWS = 8   # the proxy's forward passes; its rows are sampled from these
RESULT_FORMAT = "compression-studio-sensitivity"
RESULT_VERSION = 2          # 2: a menu of options (bits x group sizes), KL at a few of them
TINY_PROXY = 1e-30          # below this a proxy error is "exact": no ratio is taken against it
# Where the final norm sits, for the architectures whose blocks we re-run (blocks.BLOCK_PATHS).
FINAL_NORMS = ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f",
               "gpt_neox.final_layer_norm", "transformer.norm_f", "model.language_model.norm")


# --- which model a result belongs to ---------------------------------------------------------

@dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    layers: tuple[str, ...]
    fingerprint: str  # sha1 over shapes and a strided sample of every quantizable weight

    @classmethod
    def of(cls, handle) -> "ModelIdentity":
        digest = hashlib.sha1()
        for info in handle.quantizable:
            w = handle.weight(info.name)
            flat = w.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256]
            digest.update(f"{info.name}{tuple(w.shape)}".encode())
            digest.update(sample.float().numpy().tobytes())
        return cls(handle.architecture, tuple(i.name for i in handle.quantizable),
                   digest.hexdigest())

    def check(self, handle) -> None:
        other = ModelIdentity.of(handle)
        if other.architecture != self.architecture:
            raise StudioError(f"These sensitivity results were measured on a {self.architecture}, "
                              f"but the open model is a {other.architecture}. Run the "
                              f"sensitivity sweep on this model.")
        if other.layers != self.layers:
            raise StudioError(f"These sensitivity results were measured on a model with "
                              f"{len(self.layers)} quantizable layers, this one has "
                              f"{len(other.layers)} (or other names). Run the sweep on this model.")
        if other.fingerprint != self.fingerprint:
            raise StudioError("These sensitivity results were measured on a model with the same "
                              "layers but different weights. Run the sweep on this model.")


# --- the result ------------------------------------------------------------------------------

@dataclass
class SensitivityResult:
    identity: ModelIdentity
    layers: list[str]
    shapes: list[tuple[int, int]]
    options: list[QuantSpec]       # RTN grids, one per column of proxy_error / sqnr_db
    method: str                    # the method plans built from these results use
    proxy_error: np.ndarray        # [layers, options] relative output error (0 = exact)
    sqnr_db: np.ndarray            # [layers, options]
    kl_options: list[int]          # columns (indices into options) measured end to end
    kl: np.ndarray | None          # [layers, kl_options] mean KL per predicted token, nats
    ppl: np.ndarray | None         # [layers, kl_options] perplexity with only that layer quantized
    base_ppl: float | None
    text_label: str
    seqlen: int
    kl_windows: int
    proxy_tokens: int
    proxy_seconds: float
    kl_seconds: float
    # The model's ends measured as units (`plan_ends.End.names`), one row each after the
    # layers, each row named by its unit's first layer (empty: a sweep of the layers only).
    ends: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Shapes that disagree (a damaged file) are refused here, before anything reads them."""
        self.options = list(self.options)
        self.ends = [tuple(names) for names in self.ends]
        body = len(self.layers) - len(self.ends)
        if body < 0 or any(not names or self.layers[body + k] != names[0]
                           for k, names in enumerate(self.ends)):
            raise StudioError("The rows of the model's ends do not match the ends listed.")
        self.kl_options = [int(j) for j in self.kl_options]
        table = (len(self.layers), len(self.options))
        if np.shape(self.proxy_error) != table or np.shape(self.sqnr_db) != table:
            raise StudioError(f"The proxy table is {np.shape(self.proxy_error)}, but there are "
                              f"{table[0]} layers x {table[1]} options.")
        if any(not 0 <= j < len(self.options) for j in self.kl_options):
            raise StudioError("The KL columns name options the result does not have.")
        measured = (len(self.layers), len(self.kl_options))
        for name, array in (("kl", self.kl), ("ppl", self.ppl)):
            if array is not None and np.shape(array) != measured:
                raise StudioError(f"The {name} table is {np.shape(array)}, but there are "
                                  f"{measured[0]} layers x {measured[1]} measured options.")
        if (self.kl is None) != (not self.kl_options):
            raise StudioError("KL columns are named without KL values, or the other way round.")

    @property
    def has_kl(self) -> bool:
        return self.kl is not None

    @property
    def labels(self) -> list[str]:
        return [option_label(o) for o in self.options]

    def column(self, spec: QuantSpec) -> int | None:
        """The option with `spec`'s grid (bits, group size, symmetric, scale dtype), or None."""
        for j, option in enumerate(self.options):
            if same_grid(option, spec):
                return j
        return None

    def spec(self, column: int) -> QuantSpec:
        """Option `column` carrying the method plans use."""
        return self.options[column].with_(method=self.method)

    def loss(self, kind: str = "auto") -> np.ndarray:
        """[layers, options] predicted loss: "kl" (end to end), "proxy", or "auto" (kl if measured).

        "kl" is the measured KL at the measured options and, elsewhere, KL_m x proxy / proxy_m
        with m the layer's measured option nearest in log proxy error (the module notes say why).
        """
        if kind == "auto":
            kind = "kl" if self.has_kl else "proxy"
        if kind == "kl":
            if self.kl is None:
                raise StudioError("These results have no KL divergence (proxy-only sweep); "
                                  "run the full sweep or allocate with the proxy.")
            return self.predicted_kl()
        if kind == "proxy":
            return self.proxy_error
        raise StudioError(f"Unknown loss {kind!r}: use kl or proxy.")

    def predicted_kl(self) -> np.ndarray:
        proxy = np.asarray(self.proxy_error, dtype=np.float64)
        kl = np.asarray(self.kl, dtype=np.float64)
        logs = np.log(np.maximum(proxy, TINY_PROXY))
        # Per layer and option: the measured option nearest in log proxy error (first on a tie).
        distance = np.abs(logs[:, :, None] - logs[:, None, self.kl_options])
        nearest = distance.argmin(axis=2)                                 # [layers, options]
        rows = np.arange(len(proxy))[:, None]
        anchor_kl = kl[rows, nearest]
        anchor_proxy = proxy[:, self.kl_options][rows, nearest]
        usable = anchor_proxy > TINY_PROXY  # an exact anchor gives no ratio: keep its KL as is
        ratio = np.divide(proxy, anchor_proxy, out=np.ones_like(proxy), where=usable)
        predicted = anchor_kl * ratio
        predicted[:, self.kl_options] = kl    # measured options: the measurement itself
        return predicted

    def subset(self, options: list[QuantSpec]) -> "SensitivityResult":
        """These results restricted to `options` (each must have been measured), keeping the
        end-to-end measurements of the options that remain."""
        cols = []
        for spec in options:
            j = self.column(spec)
            if j is None:
                raise StudioError(f"These results did not measure {option_label(spec)}.")
            cols.append(j)
        kept = [k for k, j in enumerate(self.kl_options) if j in cols]
        pick = lambda a, c: None if a is None or not kept else np.asarray(a)[:, c]  # noqa: E731
        return replace(
            self, options=[self.options[j] for j in cols],
            proxy_error=np.asarray(self.proxy_error)[:, cols],
            sqnr_db=np.asarray(self.sqnr_db)[:, cols],
            kl_options=[cols.index(self.kl_options[k]) for k in kept],
            kl=pick(self.kl, kept), ppl=pick(self.ppl, kept))

    def check_model(self, handle) -> None:
        self.identity.check(handle)

    @property
    def body_rows(self) -> int:
        """How many rows are block (quantizable) layers; the ends' rows follow them."""
        return len(self.layers) - len(self.ends)

    def end_row(self, names) -> int | None:
        """The row of the end unit made of `names` (a tied pair: both), or None if unmeasured."""
        for k, measured in enumerate(self.ends):
            if tuple(measured) == tuple(names):
                return self.body_rows + k
        return None

    def to_json(self) -> dict:
        arr = lambda a: None if a is None else np.asarray(a, dtype=float).tolist()  # noqa: E731
        return {"format": RESULT_FORMAT, "version": RESULT_VERSION,
                "identity": {"architecture": self.identity.architecture,
                             "layers": list(self.identity.layers),
                             "fingerprint": self.identity.fingerprint},
                "layers": self.layers, "shapes": [list(s) for s in self.shapes],
                "options": [{"bits": o.bits, "group_size": o.group_size,
                             "symmetric": o.symmetric, "scale_dtype": o.scale_dtype}
                            for o in self.options],
                "method": self.method, "proxy_error": arr(self.proxy_error),
                "sqnr_db": arr(self.sqnr_db), "kl_options": list(self.kl_options),
                "kl": arr(self.kl), "ppl": arr(self.ppl),
                "base_ppl": self.base_ppl, "text_label": self.text_label, "seqlen": self.seqlen,
                "kl_windows": self.kl_windows, "proxy_tokens": self.proxy_tokens,
                "proxy_seconds": self.proxy_seconds, "kl_seconds": self.kl_seconds,
                "ends": [list(names) for names in self.ends]}

    @classmethod
    def from_json(cls, data: dict) -> "SensitivityResult":
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise StudioError("This file does not hold sensitivity results.")
        if data.get("version") == 1:
            raise StudioError("These sensitivity results are version 1 (one group size per "
                              "sweep), which this studio no longer reads: run the sensitivity "
                              "sweep again.")
        if data.get("version") != RESULT_VERSION:
            raise StudioError(f"Sensitivity results version {data.get('version')!r} are not "
                              f"supported (this studio reads version {RESULT_VERSION}).")
        arr = lambda a: None if a is None else np.array(a, dtype=float)  # noqa: E731
        ident = data["identity"]
        result = cls(identity=ModelIdentity(ident["architecture"], tuple(ident["layers"]),
                                          ident["fingerprint"]),
                   layers=list(data["layers"]), shapes=[tuple(s) for s in data["shapes"]],
                   options=[QuantSpec(bits=o["bits"], group_size=o["group_size"],
                                      symmetric=o["symmetric"],
                                      scale_dtype=o.get("scale_dtype", "fp32"))
                            for o in data["options"]],
                   method=data["method"], proxy_error=arr(data["proxy_error"]),
                   sqnr_db=arr(data["sqnr_db"]), kl_options=list(data["kl_options"]),
                   kl=arr(data["kl"]), ppl=arr(data["ppl"]), base_ppl=data["base_ppl"],
                   text_label=data["text_label"], seqlen=data["seqlen"],
                   kl_windows=data["kl_windows"], proxy_tokens=data["proxy_tokens"],
                   proxy_seconds=data["proxy_seconds"], kl_seconds=data["kl_seconds"],
                   ends=[tuple(names) for names in data.get("ends", [])])
        result.check_consistent()
        return result

    def check_consistent(self) -> None:
        """Beyond the table shapes `__post_init__` checks: every field of its declared type,
        positive shapes, distinct options, non-negative errors (a file from anywhere must not
        fail later inside the allocator or a view)."""
        from studio.core.typecheck import check_dataclass

        wrong = check_dataclass(self) + [f"identity.{n}" for n in check_dataclass(self.identity)]
        if wrong:
            raise StudioError(f"{wrong[0]} is not of its declared type.")
        if (len(self.shapes) != len(self.layers) or any(d <= 0 for s in self.shapes for d in s)
                or not self.options or len({repr(o) for o in self.options}) != len(self.options)
                or np.isnan(self.proxy_error).any() or (self.proxy_error < 0).any()):
            raise StudioError("shapes, options or proxy errors are inconsistent.")

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityResult":
        data = read_json(Path(path), f"Sensitivity file {path} does not exist.")
        try:
            return cls.from_json(data)
        except StudioError as exc:
            raise StudioError(f"Sensitivity file {path}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StudioError(f"Sensitivity file {path} is not valid: {exc}.") from None


# --- the job ---------------------------------------------------------------------------------

def sensitivity_job(handle, windows: torch.Tensor, bits=DEFAULT_BITS, group_sizes=DEFAULT_GROUPS,
                    kl_bits=DEFAULT_KL_BITS, kl_group: int | None = None,
                    method: str = REFERENCE, symmetric: bool = False, gguf_native: bool = False,
                    kl_windows: int = DEFAULT_KL_WINDOWS,
                    proxy_windows: int = DEFAULT_PROXY_WINDOWS,
                    proxy_tokens: int = DEFAULT_PROXY_TOKENS, text_label: str = "",
                    seed: int = 0, measure_ends: bool = True) -> Job[SensitivityResult]:
    """Measure every quantizable layer at every option (see the module notes).

    Options are every width in `bits` at every size in `group_sizes` (-1: per-channel). The
    proxy measures all of them; the KL sweep (when `kl_windows` > 0) only the widths `kl_bits`
    at group `kl_group` (default 128), which must be among the options: len(layers) x
    len(kl_bits) runs. `gguf_native` measures the GGUF-native menu instead
    (`gguf_native_options`; `bits`, `group_sizes` and `symmetric` are then not read, and
    `kl_group` is 32).

    Options are measured with RTN whatever `method` says: GPTQ / AWQ lower every layer's error
    but rarely reorder which layers suffer most, and `method` is recorded for the plans.

    `measure_ends`: the model's ends too (`plan_ends.ends_of`), one row each after the layers.

    `windows` [count, seqlen] feed both sweeps: the proxy captures layer inputs from (up to
    `proxy_windows` of) them, the KL sweep scores the first `kl_windows` (0: proxy only).
    """
    QuantSpec(method=method)  # validates the method before any work
    options = gguf_native_options() if gguf_native else sweep_options(bits, group_sizes, symmetric)
    if kl_group is None:
        kl_group = BLOCK if gguf_native else DEFAULT_KL_GROUP
    kl_cols = kl_columns(options, kl_bits, kl_group) if kl_windows > 0 else []
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise StudioError("Sensitivity needs at least one window of text.")
    if kl_windows < 0:
        raise StudioError(f"KL windows must be 0 (proxy only) or more, not {kl_windows}.")
    if kl_windows > windows.shape[0]:
        raise StudioError(f"The KL sweep wants {kl_windows} windows but only "
                          f"{windows.shape[0]} were given.")
    layers = handle.quantizable
    if not layers:
        raise StudioError("This model has no quantizable layers.")
    ends = measured_ends(handle) if measure_ends else []
    identity = ModelIdentity.of(handle)
    proxy_ids = windows[: max(1, proxy_windows)]
    guard_job(handle, "sensitivity", windows=kl_windows if kl_cols else 0,
              seqlen=int(windows.shape[1]), proxy_windows=int(proxy_ids.shape[0]),
              proxy_tokens=proxy_tokens)

    start = time.perf_counter()
    rows = len(layers) + len(ends)
    yield Progress(0, rows, "Proxy: capturing layer inputs")
    heads = [end.names[0] for end in ends if "lm_head" in end.roles]
    inputs = capture_layer_inputs(handle, [i.name for i in layers] + heads, proxy_ids,
                                  proxy_tokens, seed)
    proxy = np.zeros((rows, len(options)))
    for row, info in enumerate(layers):
        yield Progress(row, rows, f"Proxy: {info.name}")
        w = handle.weight(info.name).float()
        x = inputs.pop(info.name)
        energy = (x @ w.T).pow(2).sum().item()
        for col, spec in enumerate(options):
            proxy[row, col] = output_error(x, w, quantized_values(w, spec), energy)
    looked_up = proxy_ids.reshape(-1)[kept_positions(proxy_ids, proxy_tokens, seed)]
    for k, end in enumerate(ends):
        yield Progress(len(layers) + k, rows, f"Proxy: {end.title}")
        proxy[len(layers) + k] = end_proxy(handle, end, inputs.pop(end.names[0], None),
                                           looked_up, options, seed)
    sqnr = np.where(proxy > 0, -10 * np.log10(np.where(proxy > 0, proxy, 1.0)), math.inf)
    proxy_seconds = time.perf_counter() - start

    kl = ppl = base_ppl = None
    start = time.perf_counter()
    if kl_cols:
        kl, ppl, base_ppl = yield from kl_sweep(handle, layers, [options[j] for j in kl_cols],
                                                windows[:kl_windows], kl_cols, ends)
    return SensitivityResult(
        identity=identity, layers=[i.name for i in layers] + [e.names[0] for e in ends],
        shapes=[i.shape for i in layers] + [end_shape(handle, e) for e in ends],
        options=options, method=method, proxy_error=proxy, sqnr_db=sqnr, kl_options=kl_cols,
        kl=kl, ppl=ppl, base_ppl=base_ppl, text_label=text_label,
        seqlen=int(windows.shape[1]), kl_windows=kl_windows if kl_cols else 0,
        proxy_tokens=proxy_tokens, proxy_seconds=proxy_seconds,
        kl_seconds=time.perf_counter() - start if kl_cols else 0.0,
        ends=[e.names for e in ends])


class _Captured(Exception):
    """Every layer has its input: the rest of the forward (final norm, lm_head) is not needed."""


def capture_layer_inputs(handle, names: list[str], windows: torch.Tensor, tokens: int,
                         seed: int) -> dict[str, torch.Tensor]:
    """Each layer's input rows [tokens, in], at the same token positions for every layer.

    Positions are drawn once (seeded) over all windows and only those rows are kept, so memory
    stays at `tokens` rows per layer however much text goes through.
    """
    keep = kept_positions(windows, tokens, seed)
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def grab(module, args):
            x = args[0].detach()
            seen[name] = x.reshape(-1, x.shape[-1])[keep].float()
            if len(seen) == len(names):
                raise _Captured
        return grab

    hooks = [handle.module(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            handle.model(input_ids=windows, use_cache=False)
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise StudioError(f"Layer {missing[0]} saw no input on the calibration text, so its "
                          f"sensitivity cannot be measured.")
    return seen


def kept_positions(windows: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """The flat token positions the proxy keeps (seeded, sorted)."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(windows.numel(), generator=generator)[: min(tokens, windows.numel())]
    return keep.sort().values


# --- the end-to-end sweep --------------------------------------------------------------------

def final_head(model: nn.Module):
    """hidden after the last block -> logits: the final norm, projection and lm_head."""
    to_head = head_input(model)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def apply(hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The logits; `weight`: the head's matrix to use instead of its own."""
        h = to_head(hidden)
        logits = (head(h) if weight is None
                  else torch.nn.functional.linear(h, weight.to(h.dtype), head.bias)).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return apply


def head_input(model: nn.Module):
    """hidden after the last block -> what the lm_head reads: the final norm (and OPT's
    projection). The quantize job takes the head's Hessian from it."""
    norm = None
    for path in FINAL_NORMS:
        try:
            norm = model.get_submodule(path)
            break
        except AttributeError:
            continue
    head = model.get_output_embeddings()
    project = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
    if norm is None or head is None:
        raise StudioError(f"{type(model).__name__}: the studio cannot find its final norm and "
                          f"output layer, so it cannot re-run its last blocks in isolation.")

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        h = norm(hidden)
        return project(h) if project is not None else h
    return apply


class BaselineScores:
    """The baseline's final logits, kept once, against which every variant's logits are scored.

    With d = z - b (variant minus baseline logits) and p the baseline's softmax,
        KL(p || q) = log(sum p e^d) - sum p d = log1p(sum p expm1(d)) - sum p d,
    which stays accurate in float32 down to the ~1e-7 nats an 8-bit layer causes (the direct
    sum p (log p - log q) loses those digits to rounding), costs four passes over the
    vocabulary instead of seven, and gives the variant's log-normaliser for free.
    """

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.logits = logits
        self.lse = torch.logsumexp(logits, dim=-1)
        self.p = torch.exp(logits - self.lse[..., None])
        self.mass = self.p.double().sum(-1)           # 1 up to rounding; divided out below
        self.ids = ids
        self.predicted = ids[:, 1:].numel()

    def nll(self, logits: torch.Tensor, lse: torch.Tensor) -> float:
        """Summed negative log-likelihood of ids[:, 1:] given logits[:, :-1]."""
        target = logits[:, :-1].gather(-1, self.ids[:, 1:, None]).squeeze(-1)
        return (lse[:, :-1] - target).double().sum().item()

    def score(self, logits: torch.Tensor) -> tuple[float, float]:
        """(mean KL per position in nats, summed NLL) of a variant's logits [n, seq, vocab]."""
        d = logits - self.logits
        first = torch.linalg.vecdot(self.p, d).double() / self.mass
        shift = torch.linalg.vecdot(self.p, torch.expm1(d)).double() / self.mass
        log_ratio = torch.log1p(shift)                # lse(variant) - lse(baseline)
        kl = (log_ratio - first).clamp_min(0.0).mean().item()
        return kl, self.nll(logits, self.lse + log_ratio.float())


def kl_sweep(handle, layers, specs, ids: torch.Tensor, columns: list[int] | None = None,
             ends: list = ()):
    """Job part: (kl [layers + ends, specs], ppl [layers + ends, specs], baseline ppl) on
    windows `ids`; `ends` (`plan_ends.End` units) follow the layers.

    Each layer measurement's Progress.detail is (layer row, column, KL), the column being
    `columns[spec index]` (the option's column in the result) when given."""
    columns = list(range(len(specs))) if columns is None else columns
    model = handle.model
    prefix, blocks = decoder_blocks(model)
    head = final_head(model)
    yield Progress(0, 1, "KL: caching the baseline")
    with torch.no_grad():
        inputs = capture_block_inputs(model, ids)
        hidden = [inputs.hidden]
        for index, block in enumerate(blocks):
            hidden.append(call_block(block, hidden[-1], inputs.at(index)))
        base = BaselineScores(head(hidden[-1]), ids)
        reference = model(input_ids=ids[:1], use_cache=False).logits.float()
    if not torch.allclose(base.logits[:1], reference, atol=1e-3, rtol=1e-3):
        raise StudioError(f"{handle.architecture}: re-running its blocks one by one does not "
                          f"reproduce the model's output, so the KL sweep cannot be measured "
                          f"(use the proxy-only sweep).")
    del reference

    block_index = {name: i for i, name in enumerate(_block_names(prefix, blocks))}
    kl = np.zeros((len(layers) + len(ends), len(specs)))
    ppl = np.zeros_like(kl)
    total = (len(layers) + len(ends)) * len(specs)
    current_block, scratch = None, None
    for row, info in enumerate(layers):
        b = _owning_block(info.name, block_index)
        if b != current_block:  # one private copy of the block; the user's model is untouched
            current_block, scratch = b, copy.deepcopy(blocks[b])
            materialise(scratch)   # a streamed block: its own float32 weights to change
        module = scratch.get_submodule(info.name[len(f"{prefix}.{b}."):])
        original = weight_matrix(module).clone()
        for col, spec in enumerate(specs):
            set_weight_matrix(module, quantized_values(original, spec))
            with torch.no_grad():
                h = call_block(scratch, hidden[b], inputs.at(b))
                for index in range(b + 1, len(blocks)):
                    h = call_block(blocks[index], h, inputs.at(index))
                kl[row, col], nll = base.score(head(h))
            ppl[row, col] = metrics.perplexity(nll, base.predicted)
            yield Progress(row * len(specs) + col + 1, total,
                           f"KL: {info.name} at {option_label(spec)}",
                           detail=(row, columns[col], kl[row, col]))
        set_weight_matrix(module, original)
    for k, end in enumerate(ends):
        row = len(layers) + k
        for col, spec in enumerate(specs):
            with torch.no_grad():
                logits = end_logits(model, end, spec, ids, hidden, inputs, blocks, head)
                kl[row, col], nll = base.score(logits)
            del logits
            ppl[row, col] = metrics.perplexity(nll, base.predicted)
            yield Progress(row * len(specs) + col + 1, total,
                           f"KL: {end.title} at {option_label(spec)}")
    return kl, ppl, metrics.perplexity(base.nll(base.logits, base.lse), base.predicted)


def _block_names(prefix: str, blocks: nn.ModuleList) -> list[str]:
    return [f"{prefix}.{i}" for i in range(len(blocks))]


def _owning_block(name: str, block_index: dict[str, int]) -> int:
    for block_name, i in block_index.items():
        if name.startswith(block_name + "."):
            return i
    raise StudioError(f"Layer {name} is not inside a decoder block, so the KL sweep cannot "
                      f"re-run it in isolation.")
