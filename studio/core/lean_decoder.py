"""A lean decode loop for Llama-family models: greedy steps through the model's own modules with
a static KV cache, without transformers' per-step plumbing (`bench` times decode with it; the
native step, `native_step.py`, and the compiled one, `compiled.py`, run on its cache)."""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

# Llama's block (pre-norm, rotary, one MLP) and its relatives that differ only where the lean
# decoder follows them, each read from the model's own modules and config:
# - Mistral and Phi-3: a sliding window over the whole model; Gemma 2/3: per layer
#   (`attention.sliding_window`, alternating sliding and full layers);
# - Qwen3 and Gemma 3: per-head q/k norms before the rotation;
# - Gemma: the scaled embedding and (1 + w) norms (the modules' own);
# - Gemma 2/3: attention-logit and final-logit soft-capping, the norms after attention and
#   around the MLP, the query_pre_attn_scalar scaling (`attention.scaling`);
# - Gemma 3: a rotary embedding per layer type (local and global bases);
# - Phi-3: q/k/v in one qkv_proj, gate/up in one gate_up_proj, a partial rotation (the
#   attention module's own apply_rotary_pos_emb).
# Anything else runs through transformers, with the reason (`lean_problem`).
LEAN_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text",
                    "phi3")


def lean_problem(model: nn.Module) -> str | None:
    """None when the lean decoder follows `model`, else why it does not (for the benchmark)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in LEAN_MODEL_TYPES:
        return f"the lean decoder does not follow {kind or type(model).__name__} blocks"
    if getattr(config, "use_sliding_window", False) and kind == "qwen2":
        return "Qwen2's sliding-window layers are not followed by the lean decoder"
    if not hasattr(getattr(model, "model", None), "rotary_emb"):
        return f"{type(model).__name__} has no model.rotary_emb for the lean decoder to call"
    return None


def lean_supported(model: nn.Module) -> bool:
    return lean_problem(model) is None


def sliding_window(config) -> int | None:
    """A window over the whole model (Mistral's, Phi-3's: a query sees its last `window` keys,
    itself included), else None."""
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", config.model_type in ("mistral", "phi3"))
    return int(window) if window and uses else None


def layer_window(config, attention) -> int | None:
    """Block's window: its attention's own (Gemma 2/3 name it per layer: None on full
    layers), else the model's."""
    if config.model_type in ("gemma2", "gemma3_text"):
        window = getattr(attention, "sliding_window", None)
        return int(window) if window else None
    return sliding_window(config)


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
        from studio.core.fuse import fuse

        self.inner = model.model
        self.head = model.lm_head
        self.layers = list(self.inner.layers)
        attention = self.layers[0].self_attn
        config = model.config
        # The rotation the model's own attention applies (Phi-3's rotates part of each head).
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.windows = [layer_window(config, layer.self_attn) for layer in self.layers]
        self.softcaps = [getattr(layer.self_attn, "attn_logit_softcapping", None)
                         for layer in self.layers]
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma 3: a rotation per layer type (local and global bases).
        types = getattr(config, "layer_types", None)
        takes_type = "layer_type" in inspect.signature(self.inner.rotary_emb.forward).parameters
        self.layer_types = list(types) if takes_type and types else None
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
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
                            if fused and hasattr(attention, "q_proj") else None)
            parts = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
            self.gate_up.append(fuse(parts) if fused and None not in parts
                                and hasattr(mlp, "act_fn") else None)

    def cache_in(self, dtype: torch.dtype) -> None:
        """Hold the KV cache in `dtype` (the native step's float32, for a bfloat16 model: a
        bfloat16 key is exact in float32, and attention reads it back in the model's dtype)."""
        if self.keys.dtype != dtype:
            self.keys, self.values = self.keys.to(dtype), self.values.to(dtype)

    @property
    def plain_problem(self) -> str | None:
        """What of this model a plain Llama block step (`compiled.py`'s: no window, no q/k
        norms, one rotation, the pre-norm block) does not follow, or None."""
        if hasattr(self.layers[0].self_attn, "q_norm"):
            return "its per-head q/k norms (Qwen3, Gemma 3) are not in the compiled step"
        if any(self.windows):
            return "its sliding window is not in the compiled step"
        if any(self.softcaps) or self.final_softcap:
            return "it soft-caps attention or final logits (Gemma 2/3)"
        if hasattr(self.layers[0], "pre_feedforward_layernorm"):
            return "its blocks norm after attention and around the MLP (Gemma 2/3)"
        if self.layer_types is not None:
            return "it rotates each layer type with its own base (Gemma 3)"
        return None

    @property
    def fused_calls(self) -> int:
        """How many q/k/v and gate/up groups run as one call."""
        return sum(f is not None for f in self.qkv + self.gate_up)

    def project_qkv(self, i: int, h: torch.Tensor):
        """Block i's q, k, v of `h`: one fused call where the block has one."""
        if self.qkv[i] is not None:
            return self.qkv[i](h)
        attention = self.layers[i].self_attn
        if not hasattr(attention, "q_proj"):   # Phi-3: one qkv_proj, q then k then v
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return attention.qkv_proj(h).split([q_size, kv_size, kv_size], dim=-1)
        return attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block i's MLP of `h`: gate and up in one fused call where the block has one."""
        mlp = self.layers[i].mlp
        if self.gate_up[i] is None:
            return mlp(h)
        gate, up = self.gate_up[i](h)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    @staticmethod
    def _visible(position: int, count: int, window: int | None
                 ) -> tuple[int, torch.Tensor | None]:
        """The first cached key the queries see, and a mask when the causal flag is not enough
        (a prompt longer than the sliding window: query i sees keys i - window + 1 .. i)."""
        end = position + count
        if window is None or end <= window:
            return 0, None
        if count == 1:
            return end - window, None
        rows = torch.arange(count)[:, None]
        cols = torch.arange(end)[None, :]
        return 0, (cols <= rows) & (rows - cols < window)

    def attend(self, i: int, q: torch.Tensor, position: int, count: int) -> torch.Tensor:
        """Block i's attention output [1, heads, count, head_dim] over its cached keys."""
        end = position + count
        start, mask = self._visible(position, count, self.windows[i])
        keys, values = self.keys[i, :, :, start:end], self.values[i, :, :, start:end]
        if keys.dtype != q.dtype:     # a float32 cache for the native step (`cache_in`)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        scaling = self.layers[i].self_attn.scaling
        cap = self.softcaps[i]
        if not cap:
            return torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=count > 1 and mask is None,
                scale=scaling, enable_gqa=self.gqa)
        # Soft-capped scores (Gemma 2): cap * tanh(s / cap) before the mask, which SDPA
        # cannot take; computed as transformers' eager attention does.
        groups = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = torch.tanh(q @ keys.transpose(2, 3) * scaling / cap) * cap
        if count > 1:
            if mask is None:
                mask = torch.ones(count, end - start, dtype=torch.bool).tril(end - start - count)
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return weights @ values

    def forward(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, vocab] of the last of `ids` [1, T], which sit at `position`..."""
        count = ids.shape[1]
        if count > 1 and position:
            raise ValueError("the lean decoder takes a prompt at position 0, then one token a step")
        end = position + count
        x = self.inner.embed_tokens(ids)
        positions = torch.arange(position, end).unsqueeze(0)
        if self.layer_types is None:
            rotation = [self.inner.rotary_emb(x, positions)] * len(self.layers)
        else:
            by_type = {t: self.inner.rotary_emb(x, positions, t) for t in set(self.layer_types)}
            rotation = [by_type[t] for t in self.layer_types]
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self.project_qkv(i, h)
            q = q.view(1, count, -1, self.head_dim)
            k = k.view(1, count, -1, self.head_dim)
            if hasattr(attention, "q_norm"):   # Qwen3, Gemma 3: per-head norms before rotating
                q, k = attention.q_norm(q), attention.k_norm(k)
            cos, sin = rotation[i]
            q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = v.view(1, count, -1, self.head_dim).transpose(1, 2)
            self.keys[i, :, :, position:end] = k
            self.values[i, :, :, position:end] = v
            out = self.attend(i, q, position, count)
            out = attention.o_proj(out.transpose(1, 2).reshape(1, count, -1))
            if hasattr(layer, "pre_feedforward_layernorm"):   # Gemma 2/3: norms around both
                x = x + layer.post_attention_layernorm(out)
                x = x + layer.post_feedforward_layernorm(
                    self.mlp(i, layer.pre_feedforward_layernorm(x)))
            else:
                x = x + out
                x = x + self.mlp(i, layer.post_attention_layernorm(x))
        logits = self.head(self.inner.norm(x[:, -1:]))[:, -1]
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
