"""The tokenizer.ggml.* keys of a Hugging Face source, as llama.cpp's convert_hf_to_gguf.py
writes them, and the check that a written file holds the source's vocabulary.

Two kinds of vocabulary: byte-level BPE ("gpt2" in GGUF: Llama 3, Qwen2, SmolLM), whose merges
come from tokenizer.json, and SentencePiece ("llama" in GGUF: Llama 2, Mistral, Gemma), whose
pieces, scores and types come from the folder's tokenizer.model (llama.cpp's tokenizer merges by
those scores; tokenizer.json does not carry them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from studio.core.errors import StudioError

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
    scores: list[float] | None = None       # SentencePiece: the merge priority of each piece
    add_space_prefix: bool | None = None    # SentencePiece: None leaves llama.cpp's default

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def is_byte_level_bpe(spec: dict) -> bool:
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback", False)
            and decoder.get("type") == "ByteLevel")


def vocabulary_kind(tokenizer, folder: Path) -> str | None:
    """"bpe" (byte-level BPE from tokenizer.json), "spm" (SentencePiece from tokenizer.model)
    or None (neither: no GGUF vocabulary the studio can write)."""
    if getattr(tokenizer, "is_fast", False) and is_byte_level_bpe(backend_json(tokenizer)):
        return "bpe"
    if (folder / SPM_FILE).is_file():
        return "spm"
    return None


def tokenizer_problem(tokenizer, folder: Path) -> str | None:
    """Why this folder's tokenizer cannot go into a GGUF (None: it can)."""
    if tokenizer is None:
        return (f"{folder.name} has no tokenizer, and llama.cpp cannot run a GGUF without its "
                f"vocabulary.")
    kind = vocabulary_kind(tokenizer, folder)
    if kind is None:
        return (f"The tokenizer of {folder.name} is neither a byte-level BPE nor a SentencePiece "
                f"model with its {SPM_FILE} (the scores llama.cpp merges by are only there). "
                f"Put the model's {SPM_FILE} in the folder, or convert the model with "
                f"llama.cpp's convert_hf_to_gguf.py (F16), open that GGUF and export from it.")
    if kind == "spm":
        return sentencepiece_problem(folder)
    if not source_merges(tokenizer):
        return f"The tokenizer of {folder.name} has no merges, which a GGUF BPE vocabulary needs."
    return None


def beyond_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Tokens whose ids the model's embedding does not have (a tokenizer class adding a default
    token, e.g. Qwen2's <|endoftext|>): the model can never take them."""
    return sorted((t for t, i in tokenizer.get_vocab().items() if i >= vocab_size),
                  key=tokenizer.get_vocab().get)


def tokenizer_keys(tokenizer, folder: Path, vocab_size: int, arch: str) -> TokenizerKeys:
    """The tokenizer.ggml.* keys of the folder's tokenizer: ids the tokenizer lacks up to the
    model's vocabulary become [PADi]; tokens beyond it are left out (`beyond_vocab`)."""
    if vocabulary_kind(tokenizer, folder) == "spm":
        return sentencepiece_keys(tokenizer, folder, vocab_size, arch)
    return byte_level_keys(tokenizer, folder, vocab_size)


def byte_level_keys(tokenizer, folder: Path, vocab_size: int) -> TokenizerKeys:
    """llama.cpp's get_vocab_base + SpecialVocab for a byte-level BPE tokenizer."""
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


def tokenizer_equal(reader, tokenizer, folder: Path) -> tuple[bool, str]:
    """Whether the written file's token list, merges (BPE) or scores (SentencePiece) and special
    ids are the source tokenizer's own (read from the tokenizer and its files, not from what the
    writer derived)."""
    def contents(key: str):
        found = reader.get_field(key)
        return None if found is None else found.contents()

    spm = vocabulary_kind(tokenizer, folder) == "spm"
    differ = []
    tokens = contents("tokenizer.ggml.tokens") or []
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < len(tokens)}
    if not tokens or any(tokens[i] != written_spelling(tokenizer, token, i, spm)
                         for token, i in vocab.items()):
        differ.append("the token list")
    ids = set(vocab.values())
    if any(i not in ids and tokens[i] != f"[PAD{i}]" for i in range(len(tokens))):
        differ.append("the padding tokens")
    if spm:
        what = "scores from tokenizer.model"
        if not scores_equal(contents("tokenizer.ggml.scores"), tokenizer, folder):
            differ.append("the scores")
    else:
        what = f"{len(source_merges(tokenizer))} merges"
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
    return True, (f"{len(vocab)} tokens, {what} and the special ids equal the source "
                  f"tokenizer's; pre-tokenizer '{contents('tokenizer.ggml.pre')}'"
                  + (f"; left out beyond the model's vocabulary: {', '.join(left_out)}"
                     if left_out else ""))


def written_spelling(tokenizer, token: str, i: int, spm: bool) -> str:
    """A SentencePiece user-defined token is written with its spaces as spaces (llama.cpp)."""
    added = tokenizer.added_tokens_decoder.get(i)
    if spm and added is not None and not added.special:
        return token.replace("\u2581", " ")
    return token


def scores_equal(scores, tokenizer, folder: Path) -> bool:
    if scores is None:
        return False
    processor = sentencepiece(folder)
    added = tokenizer.added_tokens_decoder
    return all(scores[i] == (-1000.0 if i in added else processor.GetScore(i))
               for i in range(min(processor.vocab_size(), len(scores))))


def source_merges(tokenizer) -> list[str]:
    """The tokenizer's merges as GGUF spells them: "a b" (a space inside a part becomes
    chr(ord(" ") + 256), as gguf.SpecialVocab writes it)."""
    merges = (backend_json(tokenizer).get("model") or {}).get("merges") or []
    return [m if isinstance(m, str) else
            " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m)
            for m in merges]


# --- SentencePiece ---------------------------------------------------------------------------

SPM_FILE = "tokenizer.model"
# Gemma's pieces carry their own leading spaces: llama.cpp's GemmaModel turns the prefix off.
NO_SPACE_PREFIX_ARCHS = ("gemma", "gemma2", "gemma3")


def sentencepiece(folder: Path):
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(folder / SPM_FILE))
    return processor


def sentencepiece_problem(folder: Path) -> str | None:
    try:
        sentencepiece(folder)
    except ImportError:
        return ("Writing a SentencePiece vocabulary needs the `sentencepiece` package: "
                "pip install sentencepiece")
    except Exception as exc:  # the library raises OSError / RuntimeError for a bad file
        return f"{folder.name}/{SPM_FILE} is not a SentencePiece model the library reads: {exc}"
    return None


def sentencepiece_keys(tokenizer, folder: Path, vocab_size: int, arch: str) -> TokenizerKeys:
    """llama.cpp's _create_vocab_sentencepiece: pieces, scores and types from tokenizer.model,
    then the tokenizer's added tokens over them (control when special, else user-defined with
    their spaces spelled as spaces)."""
    import gguf

    processor = sentencepiece(folder)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):
        tokens[i] = processor.IdToPiece(i)
        scores[i] = processor.GetScore(i)
        types[i] = int(piece_type(processor, i))
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= vocab_size:
            continue
        special = added.special
        tokens[i] = added.content if special else added.content.replace("\u2581", " ")
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        scores[i] = -1000.0
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    prefix = False if arch in NO_SPACE_PREFIX_ARCHS else None
    return TokenizerKeys("llama", "default", tokens, types, special, scores, prefix)


def piece_type(processor, i: int):
    import gguf

    if processor.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if processor.IsControl(i):
        return gguf.TokenType.CONTROL
    if processor.IsUnused(i):
        return gguf.TokenType.UNUSED
    if processor.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def encodes_alike(reloaded, source) -> tuple[bool, str]:
    """Whether the tokenizer transformers builds from the written file splits text as the
    source's does (keys can be equal while the file still tokenizes differently)."""
    from studio.core.text import builtin_text

    if reloaded is None:
        return False, "transformers built no tokenizer from the file"
    texts = [CHECK_TEXT, builtin_text()[:4000], " leading space", "two  spaces\n\nend"]
    for text in texts:
        want = source(text, add_special_tokens=True).input_ids
        try:
            got = reloaded(text, add_special_tokens=True).input_ids
        except Exception as exc:  # the loader built a tokenizer that cannot encode
            return False, f"transformers' tokenizer from the file cannot encode text ({exc})"
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                         min(len(got), len(want)))
            return False, (f"transformers' tokenizer from the file splits text differently "
                           f"(token {first} of {text[:30]!r}...: {got[first:first + 3]} "
                           f"against {want[first:first + 3]})")
    return True, (f"transformers' tokenizer from the file encodes {len(texts)} test texts "
                  f"(special tokens included) exactly as the source's")
