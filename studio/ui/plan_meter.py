"""The plan's meter: what the plan will weigh and the loss it predicts, in one line."""
from __future__ import annotations

from studio.core.export.gguf_types import fits_rows
from studio.core.quant.grid import native_gguf_type


def meter_text(size, loss: float | None, why: str, plan, handle, specs: dict,
               gguf_native: bool) -> str:
    """`size`: the plan's `allocate.PlanSize`; `loss`: its predicted loss, or None and `why`."""
    shown = f"{loss:.4g}" if loss is not None else f"— ({why})"
    default = "16-bit" if plan.default is None else plan.default.label
    native = f" · {gguf_mix(handle, specs)}" if gguf_native else ""
    # the figure a bpw budget reaches: with ends set to auto, over the body and them
    bits = size.bits_words(f"<b>{size.budget_bpw:.3f}</b>")
    return (f"{bits} (scales and zeros counted) · "
            f"<b>{size.size_mb:.2f}</b> MB ({size.size_bytes:,} bytes) · "
            f"predicted loss <b>{shown}</b> · default {default} · {len(plan.rules)} rule(s) · "
            f"{size.quantized} layers quantized{native}")


def gguf_mix(handle, specs: dict) -> str:
    """"GGUF: Q4_0 x 9, F16 x 5" over the block linears, and how many layers are no GGUF type
    yet, so a plan that would round on export shows it."""
    counts: dict[str, int] = {}
    for info in handle.quantizable:
        spec = specs.get(info.name)
        native = native_gguf_type(spec) if fits_rows(info.shape[1]) else None
        kind = "F16" if spec is None else (native.name if native is not None else "not GGUF-native")
        counts[kind] = counts.get(kind, 0) + 1
    mix = ", ".join(f"{k} x {n}" for k, n in sorted(counts.items()) if k != "not GGUF-native")
    stray = counts.get("not GGUF-native", 0)
    return (f"GGUF: {mix or 'none yet'}"
            + (f" · <span style='color:#b00020'>{stray} layer(s) not GGUF-native</span>"
               if stray else ""))
