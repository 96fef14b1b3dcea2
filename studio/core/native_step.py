"""A lean decoder's one-token step as one native call for all blocks (decode_step.c).

With the int4 kernel fast, what is left of an eager decode step is dispatch: ~50 small torch ops
per block, each a few microseconds, more than the block's matmuls on a 135M model. The native
step runs every block of a step in C on the same weights (the fused int4 layers' buffers), the
same KV cache (the LeanDecoder's tensors, so a torch prefill and native steps share it) and the
cos/sin torch's rotary module makes for the position; the embedding lookup, the final norm and
the output head stay in torch (one call each).

It takes a model whose every block is: RMSNorm (Llama's x / rms(x) * w, or Gemma's
x / rms(x) * (1 + w), read as its 1 + w made once), optionally per-head q/k RMSNorms before the
rotation (Qwen3, Gemma 3), optionally RMSNorms of the attention's and the MLP's outputs before
their residual adds (Gemma 2/3's four norms a block), q/k/v and gate/up fused (`fuse.py`, or
Phi-3's own qkv_proj / gate_up_proj),
each product a native layer (4- or 8-bit, each its own width, so a mixed-precision plan runs
too) or a float32 or bfloat16 Linear (a layer the plan keeps, or a float model: its decode then reads the
weights at memory speed, without torch's per-op cost), SiLU or tanh-approximated GELU
(Gemma), a rotation over the whole head or its first part (Phi-3's partial rotary factor), no
hooks. Each block has its own sliding window (a query attends to its last `window` keys:
Mistral's every layer, Gemma 2/3's sliding layers), its own attention scale (Gemma's
query_pre_attn_scalar), its own attention-logit soft-cap (Gemma 2) and its own rotary base
(Gemma 3's local and global layers: one cos/sin row per layer type); the final logits are
soft-capped as the model's head does. Gemma's embedding scale is the embedding module's own.
`NativeStep.problem(decoder)` says in a sentence why another model cannot (a layer off the
kernels, hooks, another activation or norm), and the benchmark then runs the eager step and
says why.

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
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("attn_out_norm", ctypes.c_void_p), ("mlp_out_norm", ctypes.c_void_p),
                ("window", ctypes.c_int), ("scaling", ctypes.c_float),
                ("softcap", ctypes.c_float), ("rotation", ctypes.c_int)]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("max_len", ctypes.c_int),
                ("rot_dim", ctypes.c_int), ("eps", ctypes.c_float), ("act", ctypes.c_int)]

SILU, GELU_TANH = 0, 1   # q4_shape.act


def _activation(act) -> int | None:
    """SILU or GELU_TANH by what `act` computes (transformers names its classes differently
    across versions), else None."""
    if not callable(act):
        return None
    probe = torch.linspace(-4, 4, 9)
    with torch.no_grad():
        got = act(probe)
        for code, reference in ((SILU, nn.functional.silu(probe)),
                                (GELU_TANH, nn.functional.gelu(probe, approximate="tanh"))):
            if torch.allclose(got, reference, rtol=1e-5, atol=1e-6):
                return code
    return None


FLOATS = {torch.float32: 32, torch.bfloat16: 16}   # a float Linear's dtype -> its `bits` in C


def _act_fn(mlp):
    return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)


def _norm_eps(norm) -> float | None:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


def _norm_weight(norm) -> torch.Tensor | None:
    """The float32 weight the step multiplies by, by what `norm` computes: Llama's w, or
    Gemma's 1 + w (made here, once); None when it is neither."""
    weight, eps = getattr(norm, "weight", None), _norm_eps(norm)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOATS or eps is None:
        return None
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    with torch.no_grad():
        unit = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps)
        got = norm(probe.to(weight.dtype)).float()
        for candidate in (weight.float(), 1.0 + weight.float()):
            if torch.allclose(got, candidate * unit, rtol=tolerance, atol=tolerance * 0.1):
                return candidate.contiguous()
    return None


def _qkv(layer) -> list:
    attention = layer.self_attn
    if not hasattr(attention, "q_proj"):   # Phi-3: one qkv_proj, q then k then v
        return [attention.qkv_proj]
    return [attention.q_proj, attention.k_proj, attention.v_proj]


def _gate_up(mlp) -> list:
    if hasattr(mlp, "gate_up_proj"):       # Phi-3: gate then up in one product
        return [mlp.gate_up_proj]
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
            if _activation(_act_fn(mlp)) is None:
                return f"block {i}'s activation is neither SiLU nor GELU (tanh)"
            norms = [n for n in _norms(layer).values() if n is not None]
            eps = _norm_eps(norms[0])
            for norm in norms:
                if _norm_weight(norm) is None:
                    return (f"block {i}'s {type(norm).__name__} is not x / rms(x) * w (or "
                            f"* (1 + w)) in float32 / bfloat16")
                if _norm_eps(norm) != eps:
                    return f"block {i}'s norms do not share one epsilon"
        hidden = decoder.layers[0].input_layernorm.weight.shape[0]
        dims = {c.shape[-1] for c, _ in _rotation_pairs(decoder, torch.zeros(1, 1, hidden), 0)}
        if len(dims) != 1 or min(dims) % 2 or min(dims) > decoder.head_dim:
            return (f"its rotary embedding turns {sorted(dims)} of each head's "
                    f"{decoder.head_dim} dimensions, which the step does not follow")
        return None

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.library = q4_native.library()
        decoder.cache_in(torch.float32)      # the C side reads and writes float32 keys
        first = decoder.layers[0]
        norm = first.input_layernorm
        keys = decoder.keys
        self.kept: list[torch.Tensor] = []   # float32 copies the C side points at
        cos, _ = _rotations(decoder, torch.zeros(1, 1, norm.weight.shape[0]), 0)
        self.shape = _Shape(
            hidden=norm.weight.shape[0], heads=decoder.heads,
            kv_heads=keys.shape[2], head_dim=decoder.head_dim,
            inter=sum(m.out_features for m in _gate_up(first.mlp)) // 2, max_len=keys.shape[3],
            rot_dim=cos.shape[1], eps=float(_norm_eps(norm)),
            act=_activation(_act_fn(first.mlp)))
        blocks, keep = [], self.kept

        def weight(norm) -> int | None:   # Gemma's 1 + w, a bfloat16 model's float32 copy
            if norm is None:
                return None
            keep.append(_norm_weight(norm))
            return keep[-1].data_ptr()

        types = _rotation_types(decoder)
        for i, layer in enumerate(decoder.layers):
            qkv = [_layer(m, keep) for m in _parts(decoder.qkv[i], _qkv(layer))]
            gate_up = [_layer(m, keep) for m in _parts(decoder.gate_up[i], _gate_up(layer.mlp))]
            attention, norms = layer.self_attn, _norms(layer)
            blocks.append(_Block(
                (_Layer * 3)(*qkv), _layer(attention.o_proj, keep),
                (_Layer * 2)(*gate_up), _layer(layer.mlp.down_proj, keep),
                len(qkv), len(gate_up), weight(norms["input"]), weight(norms["pre_mlp"]),
                keys[i, 0].data_ptr(), decoder.values[i, 0].data_ptr(),
                weight(norms["q"]), weight(norms["k"]),
                weight(norms["attention_out"]), weight(norms["mlp_out"]),
                decoder.windows[i] or 0, float(attention.scaling),
                float(decoder.softcaps[i] or 0.0),
                types.index(decoder.layer_types[i]) if decoder.layer_types else 0))
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
        cos, sin = _rotations(decoder, x, position)
        status = self.library.q4_decode_blocks(
            self.blocks, len(self.blocks), ctypes.byref(self.shape), x.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), position, torch.get_num_threads())
        if status:
            raise MemoryError("the native decode step could not allocate its buffers")
        if self.head is None:
            logits = decoder.head(decoder.inner.norm(x.to(embedded.dtype)))[:, -1]
        else:
            h = decoder.inner.norm(x).float().contiguous()   # float32 x: the norm stays float32
            logits = torch.empty(1, self.head.n)
            self.library.q4_float_gemv(ctypes.byref(self.head), h.data_ptr(),
                                       logits.data_ptr(), torch.get_num_threads())
        cap = decoder.final_softcap   # Gemma 2: cap * tanh(logits / cap), as the model's head
        return torch.tanh(logits / cap) * cap if cap else logits


def _norms(layer) -> dict[str, nn.Module | None]:
    """A block's RMSNorms by where the step applies them: Llama's two (before attention and
    before the MLP), Gemma 2/3's four (their post_attention_layernorm is the attention
    output's, the pre-MLP one is pre_feedforward_layernorm), Qwen3's / Gemma 3's q/k norms."""
    attention = layer.self_attn
    sandwich = hasattr(layer, "pre_feedforward_layernorm")
    return {"input": layer.input_layernorm,
            "pre_mlp": layer.pre_feedforward_layernorm if sandwich
            else layer.post_attention_layernorm,
            "attention_out": layer.post_attention_layernorm if sandwich else None,
            "mlp_out": layer.post_feedforward_layernorm if sandwich else None,
            "q": getattr(attention, "q_norm", None), "k": getattr(attention, "k_norm", None)}


def _rotation_types(decoder) -> list:
    """The rotations a step makes: one, or Gemma 3's one per layer type (local and global
    bases), in a fixed order the blocks index."""
    return sorted(set(decoder.layer_types)) if decoder.layer_types else [None]


def _rotation_pairs(decoder, x: torch.Tensor, position: int) -> list:
    """(cos, sin) per rotation type at `position`, from the model's own rotary module (every
    RoPE scaling variant included; fewer than head_dim values for a partial rotation)."""
    rotary, at = decoder.inner.rotary_emb, torch.tensor([[position]])
    return [rotary(x, at) if kind is None else rotary(x, at, kind)
            for kind in _rotation_types(decoder)]


def _rotations(decoder, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [rotations, rot_dim] float32 for `position`, as the C side reads them."""
    pairs = _rotation_pairs(decoder, x, position)
    cos = torch.cat([c.reshape(1, -1) for c, _ in pairs]).float().contiguous()
    sin = torch.cat([s.reshape(1, -1) for _, s in pairs]).float().contiguous()
    return cos, sin
