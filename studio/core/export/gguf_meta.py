"""GGUF metadata of a Hugging Face source: the architecture keys from its config and the
tokenizer keys from its tokenizer, as llama.cpp's convert_hf_to_gguf.py writes them.

Only what the studio can check is written: every architecture here is one transformers' GGUF
loader reads back (the export is verified through it), and `config_problems` refuses configs
whose forward depends on something that loader would not carry (it would rebuild another
model). The tokenizer keys are gguf_vocab.py's.
"""
from __future__ import annotations

import numpy as np
import torch


# Hugging Face model_type -> GGUF architecture, for Hugging Face folders.
HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2",
            "gemma3_text": "gemma3"}
# The config class transformers' GGUF loader builds for each GGUF architecture.
LOADER_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma2": "Gemma2Config",
                  "gemma3": "Gemma3TextConfig"}
# GGUF architectures a GGUF source may have: the studio knows how transformers' loader changes
# their tensors (llama: q/k row permutation; gemma2/3: norms stored as w + 1; others: none).
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
PERMUTED_ARCHS = ("llama",)            # llama.cpp's LlamaModel.permute of q/k rows
NORM_PLUS_ONE_ARCHS = ("gemma2", "gemma3")
# Llama 3.1-style rotary scaling ("llama3" rope) goes into a llama GGUF as the rope_freqs tensor
# (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors): llama.cpp reads it, transformers'
# GGUF loader does not, so such a file's logits are verified through llama.cpp itself.
ROPE_FREQS_ARCHS = ("llama",)

# Config entries that do not change what the model computes, or that the GGUF carries another
# way (special token ids: tokenizer.ggml.*; tied embeddings: output.weight absent).
BENIGN_CONFIG = {
    "architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings",
    "attention_dropout", "quantization_config", "model_type", "pretraining_tp",
}


SLIDING_WINDOW_CONFIG = {"sliding_window", "max_window_layers", "use_sliding_window"}


def rope_theta(config) -> float | None:
    """The rotary base (of the full-attention layers, where layer types have their own)."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_type", "default")


def rope_freqs_needed(config, arch: str) -> bool:
    return arch in ROPE_FREQS_ARCHS and rope_type(config) == "llama3"


def rope_freqs(model, config) -> np.ndarray:
    """llama.cpp's rope_freqs: the factor each default rotary frequency is divided by, taken
    from the model's own rotary embedding (so the file computes what the model computes)."""
    rotary = next(m for m in model.modules() if isinstance(getattr(m, "inv_freq", None),
                                                           torch.Tensor))
    dim = head_dim(config)
    default = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2).double() / dim))
    return (default / rotary.inv_freq.double()).float().numpy()


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_problems(config, arch: str) -> list[str]:
    """Settings of this config that transformers' GGUF loader would not rebuild: the reloaded
    model (and so the verification) would compute something else."""
    import transformers
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    carried = {name for name in GGUF_CONFIG_MAPPING[arch].values() if name}
    kwargs = {name: rope_theta(config) if name == "rope_theta" else getattr(config, name)
              for name in carried if name == "rope_theta" or hasattr(config, name)}
    rebuilt = getattr(transformers, LOADER_CONFIGS[arch])(**kwargs).to_dict()
    # A feature the source's class does not have at all (Mistral: no attention_bias) is off.
    source = {**{k: v for k, v in rebuilt.items() if not v}, **config.to_dict()}
    ignored = set(BENIGN_CONFIG)
    if rope_freqs_needed(config, arch):
        ignored.add("rope_parameters")     # written as rope_freqs (+ rope.freq_base)
    if all(kind == "full_attention" for kind in (source.get("layer_types") or []) +
           (rebuilt.get("layer_types") or [])):
        ignored |= SLIDING_WINDOW_CONFIG   # sliding-window settings no layer uses
    # Keys the config class does not know (custom extras such as SmolLM2's "is_llama_config")
    # are not read by the model: only the class's own settings are compared.
    differ = sorted(k for k in rebuilt if k not in ignored and source.get(k) != rebuilt[k])
    problems = []
    if differ:
        shown = ", ".join(f"{k}={source.get(k)!r}" for k in differ[:4])
        problems.append(f"transformers' GGUF loader would not rebuild this {config.model_type} "
                        f"as it is ({shown}{', ...' if len(differ) > 4 else ''}), so the GGUF "
                        f"could not be verified.")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if arch in ("gemma2", "gemma3") and scalar != head_dim(config):
        problems.append(f"llama.cpp scales Gemma queries by 1/sqrt(head_dim = "
                        f"{head_dim(config)}), this model by 1/sqrt({scalar}): it would compute "
                        f"another attention.")
    return problems


def config_notes(config, arch: str) -> list[str]:
    """What the file cannot carry but only changes long contexts (llama.cpp's converter writes
    these files the same way)."""
    if arch == "llama" and getattr(config, "sliding_window", None):
        return [f"This {config.model_type} attends through a sliding window of "
                f"{config.sliding_window} tokens, which a llama GGUF cannot carry: llama.cpp "
                f"attends to the whole context, the same up to {config.sliding_window} tokens."]
    return []


def write_arch_keys(writer, config, arch: str, vocab_size: int) -> None:
    """The {arch}.* keys llama.cpp reads (convert_hf_to_gguf.py TextModel and the model's class)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    if rope_theta(config) is not None:
        writer.add_rope_freq_base(rope_theta(config))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if arch in ("gemma2", "gemma3"):
        if getattr(config, "attn_logit_softcapping", None) is not None:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if getattr(config, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)
