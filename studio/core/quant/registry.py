"""The one list of quantization methods: every method is a `Quantizer` declared once.

The plan (which names and options a spec may hold), the driver (how a layer gets its
calibration and which function rounds it), the CLI (`--method`, `--opt`), the Quantize tab's
method list and options form, the plan editor, variant save/load, kernels and exports all read
this registry; nothing else names a method. torchao's handler-per-config-type is the model: a
declaration says what a method needs and produces, one entry point does the work.

Built-in methods declare themselves in their own modules (`QUANTIZER = Quantizer(...)`, listed
by module path in BUILTIN); plug-ins in other packages through the entry-point group
`compression_studio.quantizers`, whose objects are `Quantizer`s (or lists of them). A plug-in
that fails to import, or declares something invalid, is listed in `plugin_errors()` and left
out; the studio carries on. How to write one: docs/ADDING_A_METHOD.md.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.core.errors import StudioError

log = logging.getLogger(__name__)

GROUP = "compression_studio.quantizers"
# Modules declaring the built-in methods, in menu order (each holds QUANTIZER).
BUILTIN = ("studio.core.quant.rtn", "studio.core.quant.gptq", "studio.core.quant.awq",
           "studio.core.quant.smoothquant", "studio.core.quant.seqmse", "studio.core.quant.gptvq")
# What a method needs from the calibration text, i.e. how the driver calls its entry point:
#   "none"         quantize(w, spec, None): the weight alone
#   "activations"  quantize(w, spec, calib): statistics of the layer's inputs, measured on the
#                  block's inputs before any layer of the block is quantized
#   "hessian"      quantize(w, spec, calib): H = 2/n X^T X of the layer's inputs with every
#                  earlier layer of the block already quantized ("true sequential", as GPTQ)
#   "block inputs" quantize(block, block_name, inputs, specs) -> Job[{layer: coded tensor}]:
#                  the whole block and its inputs (methods that fold scales, as AWQ)
CALIBRATIONS = ("none", "activations", "hessian", "block inputs")
ALL_BITS = (2, 3, 4, 5, 6, 7, 8)
# The method used where no other applies: layers outside the blocks when a method needs the
# block, and the reference every layer's error is compared with.
REFERENCE = "rtn"


@dataclass(frozen=True)
class LayerCalibration:
    """What a layer-level entry point is given for "activations" and "hessian" methods.

    hessian  H = 2/n X^T X [in, in], float32, of the layer's n input rows (tokens)
    tokens   n
    """
    hessian: Any
    tokens: int = 0

    @property
    def input_energy(self):
        """Mean x_j^2 of each input channel (diag H / 2): SqueezeLLM's and AWQ's weighting."""
        return self.hessian.diagonal() / 2


def option(default: Any, *, low: float | None = None, high: float | None = None,
           choices: tuple | None = None, help: str = "", title: str = "") -> Any:
    """A field of a method's options dataclass: its default, range or choices, and one line of
    help (shown by `--help`, the Quantize tab's tooltips and refusals)."""
    return field(default=default, metadata={"low": low, "high": high, "choices": choices,
                                            "help": help, "title": title})


@dataclass(frozen=True)
class OptionInfo:
    """One option as the CLI, the options form and validation see it."""
    name: str
    kind: type            # bool, int, float or str (the default's type)
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    help: str = ""
    title: str = ""

    def check(self, method: str, value: Any) -> None:
        """Refuse a value of the wrong type or outside the range (recipes come from anywhere:
        a block size of 0 or a string damp would only fail deep inside a job)."""
        kind = self.kind
        ok = (isinstance(value, bool) if kind is bool
              else isinstance(value, int) and not isinstance(value, bool) if kind is int
              else isinstance(value, str) if kind is str
              else isinstance(value, (int, float)) and not isinstance(value, bool)
              and value == value)  # not NaN
        if ok and self.choices is not None and value not in self.choices:
            ok = False
        if ok and kind in (int, float) and ((self.low is not None and value < self.low)
                                            or (self.high is not None and value > self.high)):
            ok = False
        if not ok:
            raise StudioError(f"{method}'s option {self.name} must be {self.describe()}, "
                              f"not {_short(value)}.")

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        noun = {int: "a whole number", float: "a number", str: "a word"}[self.kind]
        span = ""
        if self.low is not None and self.high is not None:
            span = f" from {self.low} to {self.high}"
        elif self.low is not None:
            span = f" of at least {self.low}"
        elif self.high is not None:
            span = f" of at most {self.high}"
        return f"{noun}{span}"


@dataclass(frozen=True)
class Quantizer:
    """A quantization method, declared once.

    name         the word in recipes, `--method` and the menus (lower case)
    title        what the menus show ("GPTQ", "NF4 (normal-float codebook)")
    options      a frozen dataclass whose fields are the method's options, made with `option()`
    calibration  one of CALIBRATIONS: what the entry point receives (see there)
    quantize     the entry point (signature by `calibration`); returns a coded tensor of
                 `code_format` (or (tensor, note))
    code_format  "affine" | "codebook" | "vector" (`quant.formats`): how the codes are held,
                 saved, counted, and which kernels and export formats take them
    summary      one line for help texts
    bits         the widths it accepts (NF4: 4 only)
    suggested    grid settings the Quantize tab switches to when it is picked (SmoothQuant's
                 W8A8: bits 8, per-channel, symmetric)
    storage_bits f(spec, in_features) -> bits per weight as stored, tables and scales counted;
                 None: the affine grid's count (`grid.bits_per_weight`)
    quantize_shared  optional: layers reading one input, one calibration for all
                 (weights, calib, specs) -> [(tensor, note)] (GPTQ stacks them in one loop)
    windows_used f(seqlen) -> how many calibration windows it reads (None: all it is given)
    folds_scales its scales fold into the norms / linears found by tracing a block
                 (`quant.layout`): blocks with nowhere to fold are refused before any work
    quantize_head  optional, for a method learning from a whole block: (lm_head weight [vocab, d],
                 its inputs [tokens, d], spec) -> (tensor, s) for an untied lm_head, s [d] the
                 scales the job folds into what feeds the head (AWQ's: `awq_head.py`)
    smoothing    migrates activation outliers into the weights before quantizing, from the
                 float model's activations, and quantizes the layer's inputs to the option
                 `act_bits` (SmoothQuant); its calibration happens in that pass
    llm_compressor  the llm-compressor modifier of the same algorithm (plan exports), and
                 f(spec) -> that modifier's options; None: no equivalent, the recipe refuses
    """
    name: str
    title: str
    options: type
    calibration: str
    quantize: Callable
    code_format: str = "affine"
    summary: str = ""
    bits: tuple[int, ...] = ALL_BITS
    suggested: dict = field(default_factory=dict)
    storage_bits: Callable | None = None
    quantize_shared: Callable | None = None
    windows_used: Callable | None = None
    quantize_head: Callable | None = None
    smoothing: bool = False
    folds_scales: bool = False
    llm_compressor: str | None = None
    llm_compressor_options: Callable | None = None
    origin: str = "built-in"  # or the plug-in's distribution / entry point, set on discovery

    def __post_init__(self) -> None:
        from studio.core.quant.formats import FORMATS

        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", self.name):
            raise ValueError(f"a method name is a short lower-case word, not {self.name!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"{self.name}: calibration must be one of {CALIBRATIONS}, "
                             f"not {self.calibration!r}")
        if self.code_format not in FORMATS:
            raise ValueError(f"{self.name}: code format must be one of {tuple(FORMATS)}, "
                             f"not {self.code_format!r}")
        if not (dataclasses.is_dataclass(self.options) and isinstance(self.options, type)):
            raise ValueError(f"{self.name}: options must be a dataclass type")
        for f in dataclasses.fields(self.options):
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{self.name}: option {f.name} has no default")
        if not callable(self.quantize):
            raise ValueError(f"{self.name}: quantize must be callable")
        if not self.bits or not set(self.bits) <= set(ALL_BITS):
            raise ValueError(f"{self.name}: bits must be widths from 2 to 8")
        if self.code_format != "affine" and self.storage_bits is None:
            raise ValueError(f"{self.name}: a {self.code_format} method must say what it "
                             f"stores per weight (storage_bits)")

    @property
    def option_infos(self) -> tuple[OptionInfo, ...]:
        infos = []
        for f in dataclasses.fields(self.options):
            meta = f.metadata
            infos.append(OptionInfo(f.name, type(f.default), f.default, meta.get("low"),
                                    meta.get("high"), meta.get("choices"), meta.get("help", ""),
                                    meta.get("title", "") or f.name.replace("_", " ")))
        return tuple(infos)

    def defaults(self) -> dict[str, Any]:
        return {info.name: info.default for info in self.option_infos}

    def check_options(self, options: dict) -> None:
        infos = {info.name: info for info in self.option_infos}
        unknown = sorted(str(k) for k in set(options) - set(infos))
        if unknown:
            raise StudioError(f"{self.name} has no option {', '.join(unknown)}; "
                              f"it knows {', '.join(infos) or 'none'}.")
        for key, value in options.items():
            infos[key].check(self.name, value)

    def check_bits(self, bits: int) -> None:
        if bits not in self.bits:
            raise StudioError(f"{self.name} quantizes to {_widths(self.bits)} bits, not {bits}.")

    def settings(self, options: dict) -> Any:
        """The options dataclass filled from a spec's options (defaults for the rest)."""
        return self.options(**options)

    @property
    def needs_text(self) -> bool:
        return self.calibration != "none" or self.smoothing


class QuantizerFailed(StudioError):
    """A method's entry point failed or returned something unusable (a plug-in's bug): the job
    stops with this, naming the method, where it comes from and the layer."""


def check_result(quantizer: Quantizer, layer: str, qt: Any, shape: tuple[int, int]) -> None:
    """A coded tensor from `quantizer` for `layer` is of its declared format and shape, and
    de-quantizes to finite numbers."""
    from studio.core.quant.formats import FORMATS

    def refuse(what: str) -> None:
        raise QuantizerFailed(f"{quantizer.title} ({quantizer.origin}) returned {what} for "
                              f"{layer}.")

    fmt = FORMATS[quantizer.code_format]
    if not isinstance(qt, fmt.tensor_class()):
        refuse(f"a {type(qt).__name__}, not the {fmt.name} format's "
               f"{fmt.tensor_class().__name__} it declares")
    if tuple(qt.shape) != tuple(shape):
        refuse(f"codes of shape {list(qt.shape)}; the layer is {list(shape)}")
    if quantizer.origin != "built-in" and not bool(qt.dequantize().isfinite().all()):
        refuse("codes that de-quantize to inf or NaN")


# --- the registry ------------------------------------------------------------------------------

_lock = threading.RLock()
_registry: dict[str, Quantizer] | None = None
_errors: list[str] = []


def get(name: str) -> Quantizer:
    found = _quantizers()
    if name not in found:
        raise StudioError(f"Unknown method {name!r}; choose one of {', '.join(found)}.")
    return found[name]


def names() -> tuple[str, ...]:
    return tuple(_quantizers())


def all_quantizers() -> list[Quantizer]:
    return list(_quantizers().values())


def plugin_errors() -> list[str]:
    """One sentence per quantizer plug-in that could not be loaded."""
    _quantizers()
    return list(_errors)


def register(quantizer: Quantizer) -> None:
    """Add a method at run time (tests, scripts); its name must be new."""
    found = _quantizers()
    with _lock:
        if quantizer.name in found:
            raise StudioError(f"A method named {quantizer.name!r} is already registered.")
        found[quantizer.name] = quantizer


def reload() -> None:
    """Forget what was discovered (after installing a plug-in, or in tests)."""
    global _registry
    with _lock:
        _registry = None
        _errors.clear()


def _quantizers() -> dict[str, Quantizer]:
    global _registry
    with _lock:
        if _registry is None:
            _registry, errors = _discover()
            _errors[:] = errors
        return _registry


def _discover() -> tuple[dict[str, Quantizer], list[str]]:
    import importlib
    from importlib.metadata import entry_points

    found: dict[str, Quantizer] = {}
    for module in BUILTIN:
        quantizer = importlib.import_module(module).QUANTIZER
        found[quantizer.name] = quantizer
    errors = []
    for point in entry_points(group=GROUP):
        try:
            loaded = point.load()
            items = loaded if isinstance(loaded, (list, tuple)) else [loaded]
            for item in items:
                if not isinstance(item, Quantizer):
                    raise TypeError(f"{point.value} gives a {type(item).__name__}, "
                                    f"not a Quantizer")
                if item.name in found:
                    raise ValueError(f"method {item.name!r} is already declared by "
                                     f"{found[item.name].origin}")
            dist = getattr(point, "dist", None)
            origin = f"plug-in {dist.name if dist is not None else point.value}"
            for item in items:
                found[item.name] = dataclasses.replace(item, origin=origin)
        except Exception as exc:  # a broken plug-in is the plug-in's problem, not the user's
            errors.append(f"Quantizer plug-in {point.name!r} could not be loaded: {exc}")
            log.warning("quantizer plug-in %s failed: %s", point.name, exc)
    return found, errors


def _widths(bits: tuple[int, ...]) -> str:
    return str(bits[0]) if len(bits) == 1 else ", ".join(map(str, bits[:-1])) + f" or {bits[-1]}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
