"""A lean decoder's one-token step as one native call for all blocks (decode_step.c).

With the int4 kernel fast, what is left of an eager decode step is dispatch: ~50 small torch ops
per block, each a few microseconds, more than the block's matmuls on a 135M model. The native
step runs every block of a step in C on the same weights (the fused int4 layers' buffers), the
same KV cache (the LeanDecoder's tensors, so a torch prefill and native steps share it) and the
cos/sin torch's rotary module makes for the position; the embedding lookup, the final norm and
the output head stay in torch (one call each).

It takes a model whose every block is: RMSNorm (Llama's, Qwen2's, Mistral's), q/k/v and
gate/up fused (`fuse.py`), each product a native layer (4- or 8-bit, each its own width, so a
mixed-precision plan runs too) or a float32 or bfloat16 Linear (a layer the plan keeps, or a
float model: its decode then reads the weights at memory speed, without torch's per-op cost),
SiLU, no hooks; Mistral's
sliding window is kept (a query attends to its last `window` keys). `NativeStep.problem(decoder)` says in a sentence why another model cannot, and the
benchmark then runs the eager step and says why.

A bfloat16 model's step computes in float32 from its bfloat16 weights (as llama.cpp's BF16
type does): its activations are not rounded to bfloat16 after every op as torch's are, so its
logits are those of the same weights in float32, closer to them than the eager bf16 step's.
Its KV cache is float32 (`LeanDecoder.cache_in`), its norm weights and biases float32 copies.
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


FLOATS = {torch.float32: 32, torch.bfloat16: 16}   # a float Linear's dtype -> its `bits` in C


def _is_rms_norm(norm) -> bool:
    """Llama's RMSNorm, by what it computes (Gemma's (1 + w) is not), in float32 or bfloat16."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOATS or eps is None:
        return False
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    with torch.no_grad():
        expected = weight.float() * (probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps))
        got = norm(probe.to(weight.dtype)).float()
        return torch.allclose(got, expected, rtol=tolerance, atol=tolerance * 0.1)


def _qkv(layer) -> list:
    attention = layer.self_attn
    return [attention.q_proj, attention.k_proj, attention.v_proj]


def _gate_up(mlp) -> list:
    return [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]


def _parts(fused, modules: list) -> list:
    """The fused layer where the decoder made one, else the layers one after another."""
    return [fused.module] if fused is not None else modules


def _runs_natively(module) -> bool:
    """A native low-bit layer, or a float32 / bfloat16 Linear the step reads as it is."""
    if isinstance(module, NativeLinear):
        return True
    return (type(module) is nn.Linear and module.weight.dtype in FLOATS
            and module.weight.is_contiguous())


def _float32(tensor: torch.Tensor | None, keep: list) -> int | None:
    """The address of `tensor` in float32 (a copy, kept alive in `keep`, when it is not)."""
    if tensor is None:
        return None
    tensor = tensor.detach().float().contiguous()
    keep.append(tensor)
    return tensor.data_ptr()


def _layer(module: NativeLinear | nn.Linear, keep: list) -> _Layer:
    bias = _float32(module.bias, keep)
    if isinstance(module, nn.Linear):   # float weights [n, k] in place of codes (bits 32 / 16)
        return _Layer(module.weight.data_ptr(), None, None, bias, FLOATS[module.weight.dtype],
                      module.out_features, module.in_features, module.in_features)
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
        for i, layer in enumerate(decoder.layers):
            mlp = layer.mlp
            parts = {"q/k/v": _parts(decoder.qkv[i], _qkv(layer)),
                     "gate/up": _parts(decoder.gate_up[i], _gate_up(mlp)),
                     "o_proj": [layer.self_attn.o_proj],
                     "down_proj": [getattr(mlp, "down_proj", None)]}
            for what, modules in parts.items():
                if not all(_runs_natively(m) for m in modules):
                    return (f"block {i}'s {what} is neither on the native kernels nor a "
                            f"float32 / bfloat16 Linear")
                if any(m._forward_pre_hooks or m._forward_hooks for m in modules):
                    return f"block {i}'s {what} has hooks"
            if not _is_silu(getattr(mlp, "act_fn", None)):
                return f"block {i}'s activation is not SiLU"
            if hasattr(layer.self_attn, "q_norm"):
                return f"block {i} normalizes q and k per head (Qwen3), which the step does not"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if not _is_rms_norm(norm):
                    return (f"block {i}'s {type(norm).__name__} is not x / rms(x) * weight")
        return None

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.library = q4_native.library()
        decoder.cache_in(torch.float32)      # the C side reads and writes float32 keys
        first = decoder.layers[0]
        norm = first.input_layernorm
        keys = decoder.keys
        self.kept: list[torch.Tensor] = []   # float32 copies the C side points at
        self.shape = _Shape(
            hidden=norm.weight.shape[0],
            heads=first.self_attn.q_proj.out_features // decoder.head_dim,
            kv_heads=keys.shape[2], head_dim=decoder.head_dim,
            inter=first.mlp.gate_proj.out_features, max_len=keys.shape[3],
            window=decoder.window or 0,
            eps=float(norm.variance_epsilon), scaling=float(decoder.scaling))
        blocks, keep = [], self.kept
        for i, layer in enumerate(decoder.layers):
            qkv = [_layer(m, keep) for m in _parts(decoder.qkv[i], _qkv(layer))]
            gate_up = [_layer(m, keep) for m in _parts(decoder.gate_up[i], _gate_up(layer.mlp))]
            blocks.append(_Block(
                (_Layer * 3)(*qkv), _layer(layer.self_attn.o_proj, keep),
                (_Layer * 2)(*gate_up), _layer(layer.mlp.down_proj, keep),
                len(qkv), len(gate_up), _float32(layer.input_layernorm.weight, keep),
                _float32(layer.post_attention_layernorm.weight, keep),
                keys[i, 0].data_ptr(), decoder.values[i, 0].data_ptr()))
        self.blocks = (_Block * len(blocks))(*blocks)
        # A float head is read by the kernel too (torch's bfloat16 product is the slower).
        head = decoder.head
        native_head = (type(head) is nn.Linear and _runs_natively(head)
                       and not (head._forward_pre_hooks or head._forward_hooks))
        self.head = _layer(head, keep) if native_head else None

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        decoder = self.decoder
        if not 0 <= position < self.shape.max_len:   # the C side writes the cache there
            raise ValueError(f"position {position} is outside the cache "
                             f"(length {self.shape.max_len})")
        embedded = decoder.inner.embed_tokens(token)
        x = embedded.float().contiguous()
        cos, sin = decoder.inner.rotary_emb(x, torch.tensor([[position]]))
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        status = self.library.q4_decode_blocks(
            self.blocks, len(self.blocks), ctypes.byref(self.shape), x.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), position, torch.get_num_threads())
        if status:
            raise MemoryError("the native decode step could not allocate its buffers")
        if self.head is None:
            return decoder.head(decoder.inner.norm(x.to(embedded.dtype)))[:, -1]
        h = decoder.inner.norm(x).float().contiguous()   # float32 x: the norm stays float32
        logits = torch.empty(1, self.head.n)
        self.library.q4_float_gemv(ctypes.byref(self.head), h.data_ptr(), logits.data_ptr(),
                                   torch.get_num_threads())
        return logits
