"""Per-channel scaling groups of a decoder block, and folding a scale into them exactly.

AWQ and SmoothQuant both rescale the input channels of some linears by a vector s and undo it
in the op that produces those inputs, so the block computes the same function before any
rounding:  prev(x) / s  feeds  W * s  (columns).  A *scaling group* names the three parties:

    prev     the op whose output is divided by s (a norm, or a linear's output rows)
    linears  the linears that read that output (their input columns are multiplied by s)
    inspect  the module whose output error judges a candidate s (AWQ's `module2inspect`)

Names are relative to the block. Which groups exist follows the reference implementations
(mit-han-lab/llm-awq `auto_scale.py`, mit-han-lab/smoothquant `smooth.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.layers import is_linear, weight_matrix

# Decoder-block classes laid out like Llama: input_layernorm -> self_attn.{q,k,v,o}_proj,
# post_attention_layernorm -> mlp.{gate,up,down}_proj with down(act(gate(x)) * up(x)).
LLAMA_LIKE = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
              "Qwen3DecoderLayer", "GemmaDecoderLayer")
OPT_LIKE = ("OPTDecoderLayer",)
GPT2_LIKE = ("GPT2Block",)
SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma, OPT and GPT-2"


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                 # op whose output is divided by s
    linears: tuple[str, ...]  # linears whose input columns are multiplied by s
    inspect: str              # module whose output error measures the group
    norm_preceded: bool       # prev is a norm: the groups SmoothQuant smooths


def _norm(prev: str, linears: tuple[str, ...], inspect: str) -> ScaleGroup:
    return ScaleGroup(prev, linears, inspect, True)


def _linear(prev: str, linear: str) -> ScaleGroup:
    """A linear feeding a linear: measured on the second one alone, as the reference does."""
    return ScaleGroup(prev, (linear,), linear, False)


def scaling_groups(block: nn.Module) -> list[ScaleGroup]:
    """The block's scaling groups, in the order the reference searches them."""
    kind = type(block).__name__
    if kind in LLAMA_LIKE:
        return _llama_groups(block)
    if kind in OPT_LIKE:
        return _opt_groups(block)
    if kind in GPT2_LIKE:
        return [_norm("ln_1", ("attn.c_attn",), "attn"), _norm("ln_2", ("mlp.c_fc",), "mlp")]
    raise StudioError(f"AWQ and SmoothQuant do not know the layout of {kind} blocks; they "
                      f"support {SUPPORTED} models. Use RTN or GPTQ for this model.")


def _llama_groups(block: nn.Module) -> list[ScaleGroup]:
    groups = [_norm("input_layernorm",
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    # v -> o only when every o input channel is exactly one v output channel: with grouped-query
    # attention each v head feeds several o heads, so v's rows cannot carry o's column scales
    # (llm-awq PR #67).
    v, o = block.self_attn.v_proj, block.self_attn.o_proj
    if weight_matrix(v).shape[0] == weight_matrix(o).shape[1]:
        groups.append(_linear("self_attn.v_proj", "self_attn.o_proj"))
    groups.append(_norm("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    # down(act(gate) * up): the product is linear in up's output, so up's rows can take 1/s.
    groups.append(_linear("mlp.up_proj", "mlp.down_proj"))
    return groups


def _opt_groups(block: nn.Module) -> list[ScaleGroup]:
    if not getattr(block, "do_layer_norm_before", True):
        # OPT-350m normalises after attention: no norm sits in front of the linears.
        raise StudioError("This OPT model applies its layer norms after attention (like "
                          "OPT-350m), so AWQ/SmoothQuant have no norm to fold scales into. "
                          "Use RTN or GPTQ for it.")
    groups = [_norm("self_attn_layer_norm",
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
              _linear("self_attn.v_proj", "self_attn.out_proj"),
              _norm("final_layer_norm", ("fc1",), "fc1")]  # the reference inspects fc1 alone
    # relu(x / s) * s == relu(x) for s > 0; other activations are not positively homogeneous.
    if isinstance(getattr(block, "activation_fn", None), nn.ReLU):
        groups.append(_linear("fc1", "fc2"))
    return groups


def check_supported(blocks) -> None:
    """Raise the StudioError of `scaling_groups` before any work starts."""
    for block in blocks:
        scaling_groups(block)


# --- folding ------------------------------------------------------------------------------

@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide `prev`'s output by s and multiply the linears' input columns by s, in place."""
    if not torch.all(s > 0):
        raise ValueError("scales must be positive to fold")
    divide_output(block.get_submodule(group.prev), s)
    for name in group.linears:
        scale_input_columns(block.get_submodule(name), s)


def divide_output(module: nn.Module, s: torch.Tensor) -> None:
    """Make `module`'s output channels come out divided by s."""
    if is_linear(module):
        w = weight_matrix(module)  # [out, in]; a view for Conv1D, so in-place ops land in it
        if w.shape[0] != s.numel():
            raise ValueError(f"scale of {s.numel()} channels for {w.shape[0]} outputs")
        w.div_(s.to(w.dtype).view(-1, 1))
        if module.bias is not None:
            module.bias.data.div_(s.to(module.bias.dtype))
        return
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name:
        weight = module.weight.data
        if norm_offset(module):
            # Gemma's RMSNorm multiplies by (1 + weight): (1 + w) / s == 1 + w'.
            weight.copy_((1.0 + weight.float()).div(s).sub(1.0).to(weight.dtype))
        else:
            weight.div_(s.to(weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.data.div_(s.to(module.bias.dtype))
        return
    raise StudioError(f"Cannot fold a scale into a {name}; only norms and linear layers "
                      f"can take one.")


def scale_input_columns(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply the input columns of a linear (nn.Linear or GPT-2 Conv1D) by s, in place."""
    w = weight_matrix(module)
    if w.shape[1] != s.numel():
        raise ValueError(f"scale of {s.numel()} channels for {w.shape[1]} inputs")
    w.mul_(s.to(w.dtype).view(1, -1))


def norm_offset(module: nn.Module) -> bool:
    """True for norms that multiply by (1 + weight) (Gemma's RMSNorm family)."""
    name = type(module).__name__
    return name.startswith("Gemma") and "RMSNorm" in name
