"""A lean decode loop for Llama-family models: greedy steps through the model's own modules with
a static KV cache, without transformers' per-step plumbing (`bench` times decode with it; the
native step, `native_step.py`, and the compiled one, `compiled.py`, run on its cache)."""
from __future__ import annotations

import torch
from torch import nn

# Llama's block (pre-norm, rotary, one MLP) and its relatives that differ only where the lean
# decoder follows them: Mistral's sliding window, Qwen3's per-head q/k norms, Gemma's scaled
# embedding and (1 + w) norms (the model's own modules). Gemma 2/3 (soft-capping, extra norms)
# and Phi-3 (fused projections under other names) run through transformers.
LEAN_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma")


def lean_supported(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in LEAN_MODEL_TYPES
            and not getattr(config, "use_sliding_window", False)
            and hasattr(getattr(model, "model", None), "rotary_emb"))


def sliding_window(config) -> int | None:
    """Mistral's window (a query sees its last `window` keys, itself included), else None."""
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", config.model_type == "mistral")
    return int(window) if window and uses else None


class LeanDecoder:
    """Greedy steps through a Llama-family model's own modules, without transformers' per-step
    plumbing (cache objects, mask building, output records, decorators).

    Eager transformers spends several milliseconds per decode step outside the matmuls; on a
    135M model that is a third of an int4 step. Here the KV cache is two preallocated tensors
    written in place (a static cache), decode attention needs no mask (one query sees every
    cached key) and prefill uses the causal flag. The layers themselves (kernel modules, norms,
    rotary embedding, hooks) are the model's, so the logits are the same as its forward's.
    """

    def __init__(self, model: nn.Module, max_len: int, fused: bool = False) -> None:
        """`fused`: q/k/v and gate/up run as one call each (`studio.core.fuse`); this
        re-points the model's layers at the fused weights, so only for a model the caller owns
        (the benchmark's own copies), never one that shares tensors with others."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from studio.core.fuse import fuse

        self.rotate = apply_rotary_pos_emb
        self.inner = model.model
        self.head = model.lm_head
        self.layers = list(self.inner.layers)
        attention = self.layers[0].self_attn
        config = model.config
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.window = sliding_window(model.config)
        self.gqa = config.num_attention_heads != config.num_key_value_heads
        embedding = self.inner.embed_tokens   # (a coded one: its dtype, no table made)
        dtype = getattr(embedding, "weight_dtype", None) or embedding.weight.dtype
        shape = (len(self.layers), 1, config.num_key_value_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.qkv, self.gate_up = [], []
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.qkv.append(fuse([attention.q_proj, attention.k_proj, attention.v_proj])
                            if fused else None)
            parts = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
            self.gate_up.append(fuse(parts) if fused and None not in parts
                                and hasattr(mlp, "act_fn") else None)

    @property
    def fused_calls(self) -> int:
        """How many q/k/v and gate/up groups run as one call."""
        return sum(f is not None for f in self.qkv + self.gate_up)

    def project_qkv(self, i: int, h: torch.Tensor):
        """Block i's q, k, v of `h`: one fused call where the block has one."""
        if self.qkv[i] is not None:
            return self.qkv[i](h)
        attention = self.layers[i].self_attn
        return attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block i's MLP of `h`: gate and up in one fused call where the block has one."""
        mlp = self.layers[i].mlp
        if self.gate_up[i] is None:
            return mlp(h)
        gate, up = self.gate_up[i](h)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _visible(self, position: int, count: int) -> tuple[int, torch.Tensor | None]:
        """The first cached key the queries see, and a mask when the causal flag is not enough
        (a prompt longer than the sliding window: query i sees keys i - window + 1 .. i)."""
        end = position + count
        if self.window is None or end <= self.window:
            return 0, None
        if count == 1:
            return end - self.window, None
        rows = torch.arange(count)[:, None]
        cols = torch.arange(end)[None, :]
        return 0, (cols <= rows) & (rows - cols < self.window)

    def forward(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, vocab] of the last of `ids` [1, T], which sit at `position`..."""
        count = ids.shape[1]
        if count > 1 and position:
            raise ValueError("the lean decoder takes a prompt at position 0, then one token a step")
        end = position + count
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, torch.arange(position, end).unsqueeze(0))
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self.project_qkv(i, h)
            q = q.view(1, count, -1, self.head_dim)
            k = k.view(1, count, -1, self.head_dim)
            if hasattr(attention, "q_norm"):   # Qwen3: per-head norms before the rotation
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = v.view(1, count, -1, self.head_dim).transpose(1, 2)
            self.keys[i, :, :, position:end] = k
            self.values[i, :, :, position:end] = v
            start, mask = self._visible(position, count)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, self.keys[i, :, :, start:end], self.values[i, :, :, start:end],
                attn_mask=mask, is_causal=count > 1 and mask is None, scale=self.scaling,
                enable_gqa=self.gqa)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(1, count, -1))
            h = layer.post_attention_layernorm(x)
            x = x + self.mlp(i, h)
        return self.head(self.inner.norm(x[:, -1:]))[:, -1]
