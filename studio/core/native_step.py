"""A lean decoder's one-token step as one native call for all blocks (decode_step.c).

With the int4 kernel fast, what is left of an eager decode step is dispatch: ~50 small torch ops
per block, each a few microseconds, more than the block's matmuls on a 135M model. The native
step runs every block of a step in C on the same weights (the fused int4 layers' buffers), the
same KV cache (the LeanDecoder's tensors, so a torch prefill and native steps share it) and the
cos/sin torch's rotary module makes for the position; the embedding lookup, the final norm and
the output head stay in torch (one call each).

It takes a model whose every block is: RMSNorm (Llama's, Qwen2's, Mistral's; float32), q/k/v and
gate/up fused (`fuse.py`), each product a native layer (4- or 8-bit, each its own width, so a
mixed-precision plan runs too) or a float32 Linear (a layer the plan keeps, or a float32
model: its decode then reads the weights at memory speed, without torch's per-op cost), SiLU,
no hooks; Mistral's
sliding window is kept (a query attends to its last `window` keys). `NativeStep.problem(decoder)` says in a sentence why another model cannot, and the
benchmark then runs the eager step and says why.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from studio.core import q4_native
from studio.core.q4_native import NativeLinear


class _Layer(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("bits", ctypes.c_int),
                ("n", ctypes.c_int), ("k", ctypes.c_int), ("group", ctypes.c_int)]


class _Block(ctypes.Structure):
    _fields_ = [("qkv", _Layer * 3), ("o", _Layer), ("gate_up", _Layer * 2), ("down", _Layer),
                ("qkv_parts", ctypes.c_int), ("gate_up_parts", ctypes.c_int),
                ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("max_len", ctypes.c_int),
                ("window", ctypes.c_int), ("eps", ctypes.c_float), ("scaling", ctypes.c_float)]


def _is_silu(act) -> bool:
    """By what it computes: transformers names its SiLU class differently across versions."""
    if not callable(act):
        return False
    probe = torch.linspace(-4, 4, 9)
    with torch.no_grad():
        return torch.allclose(act(probe), nn.functional.silu(probe))


def _is_rms_norm(norm) -> bool:
    """Llama's RMSNorm, by what it computes (Gemma's (1 + w) and float32 checks included)."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or eps is None:
        return False
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = weight * (probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps))
        return torch.allclose(norm(probe), expected, rtol=1e-5, atol=1e-6)


def _qkv(layer) -> list:
    attention = layer.self_attn
    return [attention.q_proj, attention.k_proj, attention.v_proj]


def _gate_up(mlp) -> list:
    return [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]


def _parts(fused, modules: list) -> list:
    """The fused layer where the decoder made one, else the layers one after another."""
    return [fused.module] if fused is not None else modules


def _runs_natively(module) -> bool:
    """A native low-bit layer, or a float32 Linear the step reads as it is."""
    if isinstance(module, NativeLinear):
        return True
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32
            and module.weight.is_contiguous()
            and (module.bias is None or module.bias.dtype == torch.float32))


def _layer(module: NativeLinear | nn.Linear) -> _Layer:
    bias = None if module.bias is None else module.bias.data_ptr()
    if isinstance(module, nn.Linear):   # float32 weights [n, k] in place of codes (bits 32)
        return _Layer(module.weight.data_ptr(), None, None, bias, 32, module.out_features,
                      module.in_features, module.in_features)
    return _Layer(module.codes.data_ptr(), module.scales.data_ptr(), module.mins.data_ptr(),
                  bias, module.bits, module.out_features, module.in_features, module.group)


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
        if decoder.native_problem:   # what the decoder knows the step does not read
            return decoder.native_problem
        if decoder.keys.dtype != torch.float32:
            return "its KV cache is not float32"
        for i, layer in enumerate(decoder.layers):
            mlp = layer.mlp
            parts = {"q/k/v": _parts(decoder.qkv[i], _qkv(layer)),
                     "gate/up": _parts(decoder.gate_up[i], _gate_up(mlp)),
                     "o_proj": [layer.self_attn.o_proj],
                     "down_proj": [getattr(mlp, "down_proj", None)]}
            for what, modules in parts.items():
                if not all(_runs_natively(m) for m in modules):
                    return (f"block {i}'s {what} is neither on the native kernels nor a "
                            f"float32 Linear")
                if any(m._forward_pre_hooks or m._forward_hooks for m in modules):
                    return f"block {i}'s {what} has hooks"
            if not _is_silu(getattr(mlp, "act_fn", None)):
                return f"block {i}'s activation is not SiLU"
            if hasattr(layer.self_attn, "q_norm"):
                return f"block {i} normalizes q and k per head (Qwen3), which the step does not"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not _is_rms_norm(norm):
                    return (f"block {i}'s {type(norm).__name__} is not x / rms(x) * weight in "
                            f"float32")
        return None

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.library = q4_native.library()
        first = decoder.layers[0]
        norm = first.input_layernorm
        keys = decoder.keys
        self.shape = _Shape(
            hidden=norm.weight.shape[0],
            heads=first.self_attn.q_proj.out_features // decoder.head_dim,
            kv_heads=keys.shape[2], head_dim=decoder.head_dim,
            inter=first.mlp.gate_proj.out_features, max_len=keys.shape[3],
            window=decoder.window or 0,
            eps=float(norm.variance_epsilon), scaling=float(decoder.scaling))
        blocks = []
        for i, layer in enumerate(decoder.layers):
            qkv = _parts(decoder.qkv[i], _qkv(layer))
            gate_up = _parts(decoder.gate_up[i], _gate_up(layer.mlp))
            blocks.append(_Block(
                (_Layer * 3)(*map(_layer, qkv)), _layer(layer.self_attn.o_proj),
                (_Layer * 2)(*map(_layer, gate_up)), _layer(layer.mlp.down_proj),
                len(qkv), len(gate_up), layer.input_layernorm.weight.data_ptr(),
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
