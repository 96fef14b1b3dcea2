"""The lean decoder's one-token step compiled with torch.compile (CPU inductor), so a decode
step is a few generated C++ loops and kernel calls instead of hundreds of Python-dispatched ops.

The step has static shapes, as inductor wants them (one compile per model and cache length,
reused for every position): the KV cache is the lean decoder's preallocated tensors, written
with `index_copy_` at a position held in a tensor, and attention reads the whole cache with a
mask of the positions filled so far (the rest are masked out, whatever stale values they hold).
Prefill stays eager (`LeanDecoder.forward`), writing the same cache.

Compiling takes tens of seconds the first time (inductor keeps its results on disk, so later
compiles of the same graph are faster); `compile_problem()` says why it cannot happen (no C++
compiler, no inductor) and a failure while compiling falls back to the eager step with the
reason, never an error for the user.
"""
from __future__ import annotations

import logging
import shutil

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def compile_problem() -> str | None:
    """None when torch.compile can build CPU code here, else why not (a sentence)."""
    try:
        import torch._inductor.config as config
    except Exception as exc:  # a torch build without inductor
        return f"torch.compile's inductor is not available ({exc})"
    compiler = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    if not compiler or shutil.which(compiler) is None:
        return (f"no C++ compiler ({compiler or 'g++'}) on this machine: torch.compile needs "
                f"one for CPU code")
    return None


class CompiledStep:
    """`step(token [1, 1], position) -> logits [1, vocab]` for a LeanDecoder, compiled on its
    first call. `reason` says why it runs eager when it does."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.reason = compile_problem() or decoder.plain_problem
        self.compiled = None if self.reason else torch.compile(self._step, dynamic=False)
        self.positions = torch.arange(decoder.keys.shape[3])

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(token, torch.tensor([position]))
            except Exception as exc:  # inductor / compiler failure: eager, with the reason
                self.reason = f"compilation failed: {str(exc).splitlines()[0][:200]}"
                log.warning("decode step runs eager: %s", self.reason)
                self.compiled = None
        return self.decoder.forward(token, position)

    @property
    def mode(self) -> str:
        return "compiled" if self.compiled is not None else f"eager ({self.reason})"

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = d.inner.embed_tokens(token)
        cos, sin = d.inner.rotary_emb(x, position[None])
        mask = (self.positions <= position)[None, None, None, :]
        for i, layer in enumerate(d.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = d.project_qkv(i, h)
            q = q.view(1, 1, -1, d.head_dim).transpose(1, 2)
            k = k.view(1, 1, -1, d.head_dim).transpose(1, 2)
            v = v.view(1, 1, -1, d.head_dim).transpose(1, 2)
            q, k = d.rotate(q, k, cos, sin)
            d.keys[i].index_copy_(2, position, k)
            d.values[i].index_copy_(2, position, v)
            out = F.scaled_dot_product_attention(q, d.keys[i], d.values[i], attn_mask=mask,
                                                 scale=d.scaling, enable_gqa=d.gqa)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
            h = layer.post_attention_layernorm(x)
            x = x + d.mlp(i, h)
        return d.head(d.inner.norm(x))[:, -1]
