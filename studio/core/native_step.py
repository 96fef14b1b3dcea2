"""A lean decoder's one-token step as one native call for all blocks (decode_step.c).

With the int4 kernel fast, what is left of an eager decode step is dispatch: ~50 small torch ops
per block, each a few microseconds, more than the block's matmuls on a 135M model. The native
step runs every block of a step in C on the same weights (the fused int4 layers' buffers), the
same KV cache (the LeanDecoder's tensors, so a torch prefill and native steps share it) and the
cos/sin torch's rotary module makes for the position; the embedding lookup, the final norm and
the output head stay in torch (one call each).

It takes a model whose every block is: RMSNorm weights (Llama's and Qwen2's, float32), q/k/v and
gate/up fused into native int4 layers (`fuse.py`), o_proj and down_proj native int4, SiLU, no
hooks. `NativeStep.problem(decoder)` says in a sentence why another model cannot, and the
benchmark then runs the eager step and says why.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from studio.core import q4_native
from studio.core.q4_native import NativeInt4Linear


class _Layer(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int), ("k", ctypes.c_int), ("group", ctypes.c_int)]


class _Block(ctypes.Structure):
    _fields_ = [("qkv", _Layer), ("o", _Layer), ("gate_up", _Layer), ("down", _Layer),
                ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("max_len", ctypes.c_int),
                ("eps", ctypes.c_float), ("scaling", ctypes.c_float)]


def _is_silu(act) -> bool:
    """By what it computes: transformers names its SiLU class differently across versions."""
    if not callable(act):
        return False
    probe = torch.linspace(-4, 4, 9)
    with torch.no_grad():
        return torch.allclose(act(probe), nn.functional.silu(probe))


def _layer(module: NativeInt4Linear) -> _Layer:
    return _Layer(module.codes.data_ptr(), module.scales.data_ptr(), module.mins.data_ptr(),
                  None if module.bias is None else module.bias.data_ptr(),
                  module.out_features, module.in_features, module.group)


class NativeStep:
    """`step(token [1, 1], position) -> logits [1, vocab]` for a LeanDecoder, in one native
    call for the blocks. Build it only where `problem(decoder)` is None."""

    mode = "native (every block in one C call)"

    @staticmethod
    def problem(decoder) -> str | None:
        """None when the native step can run `decoder`'s model, else why not."""
        why = q4_native.unavailable()
        if why:
            return f"the native kernel is unavailable: {why}"
        if decoder.keys.dtype != torch.float32:
            return "its KV cache is not float32"
        for i, layer in enumerate(decoder.layers):
            mlp = layer.mlp
            parts = {"q/k/v": decoder.qkv[i] and decoder.qkv[i].module,
                     "gate/up": decoder.gate_up[i] and decoder.gate_up[i].module,
                     "o_proj": layer.self_attn.o_proj, "down_proj": getattr(mlp, "down_proj", None)}
            for what, module in parts.items():
                if not isinstance(module, NativeInt4Linear):
                    return f"block {i}'s {what} is not one native int4 layer"
                if module._forward_pre_hooks or module._forward_hooks:
                    return f"block {i}'s {what} has hooks"
            if not _is_silu(getattr(mlp, "act_fn", None)):
                return f"block {i}'s activation is not SiLU"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if type(norm).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm"):
                    return f"block {i}'s norm is a {type(norm).__name__}, not an RMSNorm"
                if norm.weight.dtype != torch.float32:
                    return f"block {i}'s norm weights are not float32"
        return None

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.library = q4_native.library()
        first = decoder.layers[0]
        norm = first.input_layernorm
        keys = decoder.keys
        self.shape = _Shape(
            hidden=norm.weight.shape[0], heads=decoder.qkv[0].sizes[0] // decoder.head_dim,
            kv_heads=keys.shape[2], head_dim=decoder.head_dim,
            inter=decoder.gate_up[0].sizes[0], max_len=keys.shape[3],
            eps=float(norm.variance_epsilon), scaling=float(decoder.scaling))
        blocks = []
        for i, layer in enumerate(decoder.layers):
            blocks.append(_Block(
                _layer(decoder.qkv[i].module), _layer(layer.self_attn.o_proj),
                _layer(decoder.gate_up[i].module), _layer(layer.mlp.down_proj),
                layer.input_layernorm.weight.data_ptr(),
                layer.post_attention_layernorm.weight.data_ptr(),
                keys[i, 0].data_ptr(), decoder.values[i, 0].data_ptr()))
        self.blocks = (_Block * len(blocks))(*blocks)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        decoder = self.decoder
        if not 0 <= position < self.shape.max_len:   # the C side writes the cache there
            raise ValueError(f"position {position} is outside the cache "
                             f"(length {self.shape.max_len})")
        x = decoder.inner.embed_tokens(token).float().contiguous()
        cos, sin = decoder.inner.rotary_emb(x, torch.tensor([[position]]))
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        status = self.library.q4_decode_blocks(
            self.blocks, len(self.blocks), ctypes.byref(self.shape), x.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), position, torch.get_num_threads())
        if status:
            raise MemoryError("the native decode step could not allocate its buffers")
        return decoder.head(decoder.inner.norm(x))[:, -1]
