"""The inventory of a model's weight layers: what each is, where it sits, what it costs.

Quantizable layers are the linear projections inside the transformer blocks (GPT-2's Conv1D
counts, its weight stored transposed). Embeddings and the lm_head are listed and marked, but are
only quantized when a plan names them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style "linear" layers with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()

from studio.core.quant.coded import CodedLinear

# Last name component -> role. Checked in order; the first that matches wins.
_ROLE_NAMES: list[tuple[str, tuple[str, ...]]] = [
    ("qkv", ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv")),
    ("q", ("q_proj", "query", "q_lin", "wq")),
    ("k", ("k_proj", "key", "k_lin", "wk")),
    ("v", ("v_proj", "value", "v_lin", "wv")),
    ("o", ("o_proj", "out_proj", "out_lin", "wo", "dense")),
    ("gate_up", ("gate_up_proj",)),
    ("gate", ("gate_proj", "w1")),
    ("up", ("up_proj", "fc1", "c_fc", "w3", "dense_h_to_4h", "fc_in", "lin1")),
    ("down", ("down_proj", "fc2", "w2", "dense_4h_to_h", "fc_out", "lin2")),
]
ROLES = tuple(role for role, _ in _ROLE_NAMES) + ("other", "embedding", "lm_head")
_BLOCK = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    block: int | None
    role: str
    kind: str                 # "linear", "conv1d", "embedding" or "lm_head"
    shape: tuple[int, int]    # (out, in) for linear layers; (rows, dim) for embeddings
    params: int
    dtype: str
    bytes: int
    quantizable: bool         # the plan's default applies (block linears)
    tied_to: str | None = None  # lm_head sharing its weight with the input embedding

    def to_dict(self) -> dict:
        return {"name": self.name, "block": self.block, "role": self.role, "kind": self.kind,
                "shape": list(self.shape), "params": self.params, "dtype": self.dtype,
                "bytes": self.bytes, "quantizable": self.quantizable, "tied_to": self.tied_to}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transposed "linear" layer (its weight stored [in, out])."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, CodedLinear)) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a transposed view for Conv1D; no copy; de-quantized afresh for
    a variant's CodedLinear)."""
    if is_conv1d(module):
        return module.weight.data.t()
    if isinstance(module, CodedLinear):
        return module.weight
    return module.weight.data


def read_weight_matrix(module: nn.Module) -> torch.Tensor:
    """`weight_matrix`, with a streamed weight (streaming.StoredParameter) read from its file."""
    from studio.core.streaming import real

    param = module._parameters.get("weight")
    if param is None or real(param) is param:
        return weight_matrix(module)
    return real(param).t() if is_conv1d(module) else real(param)


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an [out, in] matrix back into the layer, in the layer's own layout and dtype."""
    _check_float(module)
    target = module.weight.data
    w = w.to(target.dtype)
    target.copy_(w.t() if is_conv1d(module) else w)


def replace_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Give the layer a new weight tensor holding the [out, in] matrix `w` (in its own layout
    and dtype); unlike `set_weight_matrix`, the old tensor is left as it was."""
    _check_float(module)
    old = module.weight
    w = w.to(old.dtype)
    w = w.t() if is_conv1d(module) else w
    module.weight = nn.Parameter(w.contiguous(), requires_grad=old.requires_grad)


def _check_float(module: nn.Module) -> None:
    if isinstance(module, CodedLinear):
        raise TypeError("A quantized variant's layer holds codes, not a float weight to write.")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def move_pre_hooks(old: nn.Module, new: nn.Module) -> str:
    """Carry input hooks (SmoothQuant's simulated activation quantization) onto the module
    replacing `old`; a note naming the activation bits they quantize to ("" if none)."""
    from studio.core.streaming import STREAMING_HOOKS

    for key, hook in old._forward_pre_hooks.items():
        if hook in STREAMING_HOOKS:   # (the new module gets its own: streaming.watch)
            continue
        new.register_forward_pre_hook(hook, with_kwargs=key in old._forward_pre_hooks_with_kwargs)
    bits = sorted({getattr(h, "bits", None) for h in old._forward_pre_hooks.values()} - {None})
    return f"inputs fake-quantized to {'/'.join(map(str, bits))} bits first" if bits else ""


def role_of(name: str, in_attention: bool) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "c_proj":  # GPT-2 uses the same name for the attention output and MLP down
        return "o" if in_attention else "down"
    for role, leaves in _ROLE_NAMES:
        if leaf in leaves:
            if role == "o" and leaf == "dense" and not in_attention:
                return "other"
            return role
    return "other"


def place(name: str) -> tuple[int | None, str]:
    """(block, role) of a linear layer from its module name alone (headers have no modules)."""
    return _block_of(name), role_of(name, _in_attention(name))


def _block_of(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def _in_attention(name: str) -> bool:
    parent = name.rsplit(".", 1)[0].lower()
    return any(part in parent for part in ("attn", "attention"))


def inventory(model: nn.Module) -> list[LayerInfo]:
    """Every weight layer of `model`, in module order, with the lm_head last."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    layers: list[LayerInfo] = []
    lm_head: LayerInfo | None = None
    for name, module in model.named_modules():
        if module is output and output is not None:
            tied = input_emb is not None and output.weight is input_emb.weight
            lm_head = _info(name, module, "lm_head", "lm_head", None,
                            names.get(id(input_emb)) if tied else None)
        elif isinstance(module, nn.Embedding):
            layers.append(_info(name, module, "embedding", "embedding", None, None))
        elif is_linear(module):
            kind = "conv1d" if is_conv1d(module) else "linear"
            block, role = place(name)
            layers.append(_info(name, module, kind, role, block, None))
    if lm_head is not None:
        layers.append(lm_head)
    return layers


def _info(name: str, module: nn.Module, kind: str, role: str, block: int | None,
          tied_to: str | None) -> LayerInfo:
    w = weight_matrix(module) if kind in ("linear", "conv1d", "lm_head") else module.weight.data
    params = w.numel() + (module.bias.numel() if getattr(module, "bias", None) is not None else 0)
    quantizable = kind in ("linear", "conv1d") and block is not None
    return LayerInfo(name=name, block=block, role=role, kind=kind,
                     shape=(int(w.shape[0]), int(w.shape[1])), params=int(params),
                     dtype=str(w.dtype).replace("torch.", ""),
                     bytes=int(params * w.element_size()), quantizable=quantizable,
                     tied_to=tied_to)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting shared (tied) tensors once."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # (streamed: no storage)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def embedding_summary(layers: list[LayerInfo], param_count: int) -> dict | None:
    """How much of the model the input embedding is, and whether the lm_head shares its weight
    (a large-vocabulary model's embedding can be half its parameters, stored at 16 bits unless a
    plan quantizes it). None when the model lists no embedding."""
    embedding = next((i for i in layers if i.role == "embedding"), None)
    if embedding is None:
        return None
    head = next((i for i in layers if i.role == "lm_head"), None)
    return {"embedding": embedding.name, "params": embedding.params,
            "share": embedding.params / param_count if param_count else 0.0,
            "vocab": embedding.shape[0], "lm_head": head.name if head else None,
            "lm_head_tied": bool(head and head.tied_to == embedding.name)}
