"""A variant's tensors under the base model's Hugging Face names, for every writer.

`float_tensors` gives every tensor of the variant's model (parameters and persistent buffers,
tied ones once under each name the base model's checkpoint uses) except the weights of quantized
layers, which the writers take from `variant.qtensors` as codes. `dense_weight` gives a quantized
layer's de-quantized weight in the module's own layout (GPT-2's Conv1D stores [in, out]).
"""
from __future__ import annotations

import torch

from studio.core.layers import get_module, is_conv1d

TORCH_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def float_tensors(variant, lazy: bool = False) -> dict[str, torch.Tensor]:
    """name -> tensor of everything the variant stores as floats (not the quantized weights).
    `lazy`: a streamed model's tensors stay unread StoredParameters (meta tensors with their
    shape and stored dtype; `streaming.real` or their `read` gives the values), so a writer
    holds one at a time."""
    from studio.core.streaming import StoredParameter

    quantized = {f"{name}.weight" for name in variant.qtensors}
    state = variant.model.state_dict(keep_vars=True)
    read: dict[int, torch.Tensor] = {}   # a streamed tensor read once, as stored (tied: shared)
    out = {}
    for key, value in state.items():
        if key in quantized:
            continue
        if isinstance(value, StoredParameter) and not lazy:
            value = read.setdefault(id(value), value.read(value.dtype))
        out[key] = value if isinstance(value, StoredParameter) else value.detach()
    return out


def dense_weight(variant, handle, name: str) -> torch.Tensor:
    """The de-quantized weight of quantized layer `name`, in the layout the base checkpoint uses."""
    w = variant.qtensors[name].dequantize()
    return w.t().contiguous() if is_conv1d(get_module(handle.model, name)) else w


def dense_state_dict(variant, handle, dtype: str) -> dict[str, torch.Tensor]:
    """The whole variant as float tensors of `dtype` under the checkpoint's names."""
    target = TORCH_DTYPES[dtype]
    state = {k: v.to(target) if v.is_floating_point() else v
             for k, v in float_tensors(variant).items()}
    for name in variant.qtensors:
        state[f"{name}.weight"] = dense_weight(variant, handle, name).to(target)
    return state

