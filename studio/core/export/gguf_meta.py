"""GGUF metadata of a Hugging Face source: the architecture keys from its config and the
tokenizer keys from its tokenizer, as llama.cpp's convert_hf_to_gguf.py writes them.

Only what the studio can check is written: every architecture here is one transformers' GGUF
loader reads back (the export is verified through it), and `config_problems` refuses configs
whose forward depends on something that loader would not carry (it would rebuild another
model). Tokenizers: byte-level BPE ("gpt2" in GGUF), the kind Llama 3, Qwen2 and SmolLM use.
SentencePiece vocabularies need their scores from tokenizer.model: not written from a folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from studio.core.errors import StudioError

# Hugging Face model_type -> GGUF architecture, for Hugging Face folders.
HF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}
# GGUF architectures a GGUF source may have: the studio knows how transformers' loader changes
# their tensors (llama: q/k row permutation; gemma2/3: norms stored as w + 1; others: none).
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
PERMUTED_ARCHS = ("llama",)            # llama.cpp's LlamaModel.permute of q/k rows
NORM_PLUS_ONE_ARCHS = ("gemma2", "gemma3")

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
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_problems(config, arch: str) -> list[str]:
    """Settings of this config that transformers' GGUF loader would not rebuild: the reloaded
    model (and so the verification) would compute something else."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    carried = {name for name in GGUF_CONFIG_MAPPING[arch].values() if name}
    kwargs = {name: rope_theta(config) if name == "rope_theta" else getattr(config, name)
              for name in carried if name == "rope_theta" or hasattr(config, name)}
    rebuilt = type(config)(**kwargs).to_dict()
    source = config.to_dict()
    ignored = set(BENIGN_CONFIG)
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
    if arch == "gemma2" and scalar != head_dim(config):
        problems.append(f"llama.cpp scales Gemma 2 queries by 1/sqrt(head_dim = "
                        f"{head_dim(config)}), this model by 1/sqrt({scalar}): it would compute "
                        f"another attention.")
    return problems


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
    if arch == "gemma2":
        if config.attn_logit_softcapping is not None:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)


# --- the tokenizer ---------------------------------------------------------------------------

# llama.cpp names the pre-tokenizer (the regex split before BPE) by hashing the tokens of this
# text (convert_hf_to_gguf.py get_vocab_base_pre; checked: SmolLM2's tokenizer gives "smollm").
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_HASHES = {   # llama.cpp's table, for the families a studio user is likely to bring
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
# Split regexes llama.cpp implements under a name (its llama-vocab.cpp), preferred name first.
PREFERRED_SPLIT_NAMES = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35")


@dataclass
class TokenizerKeys:
    model: str                  # tokenizer.ggml.model
    pre: str                    # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    special: object             # gguf.SpecialVocab: merges, special ids, add_* flags, template

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)


def backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def is_byte_level_bpe(spec: dict) -> bool:
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback", False)
            and decoder.get("type") == "ByteLevel")


def tokenizer_problem(tokenizer, folder: Path) -> str | None:
    """Why this folder's tokenizer cannot go into a GGUF (None: it can)."""
    if tokenizer is None:
        return (f"{folder.name} has no tokenizer, and llama.cpp cannot run a GGUF without its "
                f"vocabulary.")
    if not getattr(tokenizer, "is_fast", False) or not is_byte_level_bpe(backend_json(tokenizer)):
        return (f"The tokenizer of {folder.name} is not a byte-level BPE (it is SentencePiece-"
                f"style); the studio writes only byte-level BPE vocabularies from a folder. "
                f"Convert the model with llama.cpp's convert_hf_to_gguf.py (F16), open that "
                f"GGUF, and export from it: its tokenizer is then copied as it is.")
    if not source_merges(tokenizer):
        return f"The tokenizer of {folder.name} has no merges, which a GGUF BPE vocabulary needs."
    return None


def beyond_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Tokens whose ids the model's embedding does not have (a tokenizer class adding a default
    token, e.g. Qwen2's <|endoftext|>): the model can never take them."""
    return sorted((t for t, i in tokenizer.get_vocab().items() if i >= vocab_size),
                  key=tokenizer.get_vocab().get)


def tokenizer_keys(tokenizer, folder: Path, vocab_size: int) -> TokenizerKeys:
    """The tokenizer.ggml.* keys of a byte-level BPE tokenizer (llama.cpp's get_vocab_base +
    SpecialVocab): ids the tokenizer lacks up to the model's vocabulary become [PADi]; tokens
    beyond it are left out (`beyond_vocab`)."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items() if i < vocab_size}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise StudioError(f"The tokenizer of {folder.name} has no merges to write.")
    pre = pre_tokenizer(tokenizer)[0] or "default"   # the preflight's notes say which, and why
    return TokenizerKeys("gpt2", pre, tokens, [int(t) for t in types], special)


def pre_tokenizer(tokenizer) -> tuple[str | None, str]:
    """llama.cpp's name for the tokenizer's pre-tokenizer, and how it was found."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_HASHES:
        return KNOWN_HASHES[digest], "llama.cpp's checksum of the tokenizer"
    name = pre_from_structure(backend_json(tokenizer).get("pre_tokenizer"))
    if name is not None:
        return name, "from the tokenizer's pre-tokenizer steps"
    return None, ""


def pre_from_structure(pre: dict | None) -> str | None:
    """Name a pre-tokenizer from its steps, for vocabularies llama.cpp has no checksum of
    (fine-tuned or small tokenizers that split like a known family)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or kinds[-1] != "ByteLevel":
        return None
    gpt2_regex = byte_level[0].get("use_regex", True)
    if kinds == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and gpt2_regex and steps[0].get("individual_digits"):
        return "smollm"    # \p{N} split, then GPT-2's regex (llama.cpp's SMOLLM pre type)
    if kinds == ["Split", "ByteLevel"] and not gpt2_regex:
        return split_name(steps[0])
    return None


def split_name(split: dict) -> str | None:
    try:  # the regexes transformers' GGUF tokenizer loader itself maps names to
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS)
    except ImportError:  # pragma: no cover - older transformers
        return None
    pattern = (split.get("pattern") or {}).get("Regex")
    if split.get("behavior") != "Isolated" or split.get("invert") or pattern is None:
        return None
    names = [n for n, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
    preferred = [n for n in PREFERRED_SPLIT_NAMES if n in names]
    return (preferred or names or [None])[0]


def tokenizer_equal(reader, tokenizer) -> tuple[bool, str]:
    """Whether the written file's token list, merges and special ids are the source
    tokenizer's own (read from the tokenizer, not from what the writer derived)."""
    def contents(key: str):
        found = reader.get_field(key)
        return None if found is None else found.contents()

    differ = []
    tokens = contents("tokenizer.ggml.tokens") or []
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < len(tokens)}
    if not tokens or any(tokens[i] != token for token, i in vocab.items()):
        differ.append("the token list")
    ids = set(vocab.values())
    if any(i not in ids and tokens[i] != f"[PAD{i}]" for i in range(len(tokens))):
        differ.append("the padding tokens")
    if contents("tokenizer.ggml.merges") != source_merges(tokenizer):
        differ.append("the merges")
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < len(tokens) and \
                contents(f"tokenizer.ggml.{key}") != token_id:
            differ.append(f"the {kind} token id")
    if not contents("tokenizer.ggml.pre"):
        differ.append("the pre-tokenizer (missing)")
    if differ:
        return False, f"differs from the source's in {', '.join(differ)}"
    left_out = beyond_vocab(tokenizer, len(tokens))
    return True, (f"{len(vocab)} tokens, {len(source_merges(tokenizer))} merges and the special "
                  f"ids equal the source tokenizer's; pre-tokenizer "
                  f"'{contents('tokenizer.ggml.pre')}'"
                  + (f"; left out beyond the model's vocabulary: {', '.join(left_out)}"
                     if left_out else ""))


def source_merges(tokenizer) -> list[str]:
    """The tokenizer's merges as GGUF spells them: "a b" (a space inside a part becomes
    chr(ord(" ") + 256), as gguf.SpecialVocab writes it)."""
    merges = (backend_json(tokenizer).get("model") or {}).get("merges") or []
    return [m if isinstance(m, str) else
            " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m)
            for m in merges]
