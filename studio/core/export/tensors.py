"""A variant's tensors under the base model's Hugging Face names, for every writer.

`float_tensors` gives every tensor of the variant's model (parameters and persistent buffers,
tied ones once under each name the base model's checkpoint uses) except the weights of quantized
layers, which the writers take from `variant.qtensors` as codes. `dense_weight` gives a quantized
layer's de-quantized weight in the module's own layout (GPT-2's Conv1D stores [in, out]).
`float_state` and `float_value` give the float tensors a file holds, each read when written.
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


def float_state(variant) -> dict[str, torch.Tensor]:
    """The variant's float tensors, each storage once (a tied lm_head is written as the
    embedding it shares, which transformers ties again, as `save_pretrained` drops the alias),
    not yet read: a streamed model's stay StoredParameters until the file reaches them
    (`float_value`)."""
    from studio.core.streaming import StoredParameter

    state, seen = {}, set()
    for key, value in float_tensors(variant, lazy=True).items():
        identity = (id(value) if isinstance(value, StoredParameter)
                    else (value.data_ptr(), tuple(value.shape)))
        if value.numel() and identity in seen:
            continue
        seen.add(identity)
        state[key] = value
    return state


def float_value(value: torch.Tensor, float_type: torch.dtype) -> torch.Tensor:
    """A tensor of `float_state` as written: floats in the export's type (a stored one read
    straight into it, so a large embedding exists once), others as they are."""
    from studio.core.streaming import StoredParameter

    if isinstance(value, StoredParameter):
        return value.read(float_type)
    return (value.to(float_type) if value.is_floating_point() else value).contiguous()
