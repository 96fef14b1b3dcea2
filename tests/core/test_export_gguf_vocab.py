"""GGUF export of Hugging Face folders with SentencePiece vocabularies (Llama 2 / Mistral /
Gemma style): pieces, scores and types come from tokenizer.model, and the written file must
tokenize like the source in transformers and in llama.cpp itself."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from studio.core.errors import StudioError
from studio.core.export import gguf_vocab, llama_cpp
from studio.core.export.job import export_job
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job

pytest.importorskip("sentencepiece")

VOCAB = 512
TEXTS = ["Hello world, two  spaces and\ttabs\n\nnew lines", " leading space 12345",
         "Unicode: é ü 漢字 🚀", "def f(x):\n    return x ** 2"]
# (transformers class, special pieces in SentencePiece id order, leading-space prefix)
STYLES = {
    "llama": ("LlamaTokenizer", dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), True),
    "mistral": ("LlamaTokenizer", dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), True),
    "gemma2": ("GemmaTokenizer", dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3), False),
    "gemma3": ("GemmaTokenizer", dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3), False),
}
SPECIAL_NAMES = {"unk_id": "<unk>", "bos_id": "<s>", "eos_id": "</s>", "pad_id": "<pad>"}
GEMMA_NAMES = {"unk_id": "<unk>", "bos_id": "<bos>", "eos_id": "<eos>", "pad_id": "<pad>"}


def sentencepiece_folder(folder, arch: str):
    """A model folder as the Hub ships Llama 2 / Gemma: tokenizer.model (a BPE SentencePiece
    model with byte fallback, trained here on Python's help text) beside a tiny random model."""
    import sentencepiece as spm
    import transformers as tf
    from transformers import AutoTokenizer

    from studio.core.text import builtin_text

    cls, ids, prefix = STYLES[arch]
    names = GEMMA_NAMES if arch.startswith("gemma") else SPECIAL_NAMES
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(builtin_text()[:150_000].splitlines()), model_writer=buffer,
        model_type="bpe", vocab_size=VOCAB, byte_fallback=True, split_digits=True,
        add_dummy_prefix=prefix, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", minloglevel=2,
        **ids, **{k.replace("_id", "_piece"): names[k] for k, v in ids.items() if v >= 0})
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    special = {k.replace("_id", "_token"): names[k] for k, v in ids.items() if v >= 0}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": cls, "add_bos_token": True, "add_eos_token": False, **special}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)   # + tokenizer.json, as shipped
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256,
                  **{k.replace("_id", "_token_id"): v for k, v in ids.items() if v >= 0})
    if arch == "llama":
        config = tf.LlamaConfig(intermediate_size=160, tie_word_embeddings=False, **common)
    elif arch == "mistral":   # written as a llama GGUF, as llama.cpp's converter does
        config = tf.MistralConfig(intermediate_size=160, sliding_window=None, **common)
    elif arch == "gemma3":   # q/k norms, (1 + w) norms, per-layer-type rotary bases; six
        # layers so one attends globally (llama.cpp aborts on a model with none)
        config = tf.Gemma3TextConfig(intermediate_size=128, head_dim=256,
                                     **{**common, "num_hidden_layers": 6})
    else:
        config = tf.Gemma2Config(intermediate_size=128, head_dim=256,   # = query_pre_attn_scalar
                                 **common)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.1)      # Gemma norms scale by (1 + w): make w matter
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(STYLES))
def exported(request, tmp_path_factory):
    folder = sentencepiece_folder(tmp_path_factory.mktemp("spm") / request.param, request.param)
    handle = run(open_model_job(folder))
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True, scale_dtype="fp16")),
                               None, None, "spm q4"))
    result = run(export_job(variant, handle, "gguf", tmp_path_factory.mktemp("out") / "out"))
    return request.param, folder, handle, variant, result


def test_sentencepiece_folder_exports_verified_with_its_vocabulary(exported):
    from gguf import GGUFReader

    arch, folder, handle, _, result = exported
    detail = json.loads((Path(result.path) / "report.json").read_text())["tokenizer_detail"]
    assert result.verified and result.tokenizer_equal, detail
    assert "scores from tokenizer.model" in detail and "encodes 4 test texts" in detail
    reader = GGUFReader(result.file)
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    processor = gguf_vocab.sentencepiece(folder)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    scores = reader.get_field("tokenizer.ggml.scores").contents()
    normal = [i for i in range(VOCAB) if i not in handle.tokenizer.added_tokens_decoder]
    assert all(tokens[i] == processor.IdToPiece(i) and scores[i] == processor.GetScore(i)
               for i in normal)
    space_prefix = reader.get_field("tokenizer.ggml.add_space_prefix")
    assert (space_prefix is not None and not space_prefix.contents()) == arch.startswith("gemma")


def test_llama_cpp_tokenizes_and_runs_the_export_like_the_source(exported):
    from studio.core.quant.coded import expanded

    if not llama_cpp.available():
        pytest.skip("cyllama is not installed")
    _, folder, handle, variant, result = exported
    # llama.cpp merges pieces by the scores written: it must split as SentencePiece itself does
    # (transformers' own tokenizer differs from both on a leading space, so it is not the judge)
    processor = gguf_vocab.sentencepiece(folder)
    for text in TEXTS:
        want = [handle.tokenizer.bos_token_id] + processor.encode(text)
        assert llama_cpp.tokenize(result.file, text) == want, text
    windows = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    got = llama_cpp.logits(result.file, windows)
    with expanded(variant.model), torch.inference_mode():
        ref = variant.model(input_ids=windows).logits
    # llama.cpp rounds activations (Q8) and the KV cache (F16): on these models that stays
    # under 2.5% of the largest logit (measured: llama, Gemma 2/3); a wrong rotary base, norm
    # or scale is >10% off
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_a_folder_without_byte_level_bpe_or_tokenizer_model_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1, "a": 2}, merges=[],
                               byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm)
    problem = gguf_vocab.tokenizer_problem(tokenizer, tmp_path)
    assert "tokenizer.model" in problem and "convert_hf_to_gguf.py" in problem
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert "is not a SentencePiece model" in gguf_vocab.tokenizer_problem(tokenizer, tmp_path)


def test_gemma_norms_are_stored_plus_one_with_their_softcapping(exported):
    from gguf import GGUFReader

    arch, _, _, variant, result = exported
    if not arch.startswith("gemma"):
        pytest.skip("Gemma only")
    reader = GGUFReader(result.file)
    tensors = {t.name: t for t in reader.tensors}
    layer = variant.model.model.layers[1]
    norms = {"blk.1.post_ffw_norm.weight": layer.post_feedforward_layernorm.weight}
    if arch == "gemma3":
        norms["blk.1.attn_q_norm.weight"] = layer.self_attn.q_norm.weight
    for name, norm in norms.items():
        assert tensors[name].tensor_type.name == "F32"
        assert torch.allclose(torch.from_numpy(tensors[name].data.copy()), norm + 1, atol=1e-7)
    softcap = reader.get_field(f"{arch}.attn_logit_softcapping")
    assert (softcap.contents() if softcap else None) == variant.model.config.attn_logit_softcapping
    assert result.max_logit_diff < 1e-3


def test_a_file_llama_cpp_aborts_on_is_refused_and_the_studio_lives_on(tmp_path):
    # Gemma 3 without a full-attention layer: transformers runs it, llama.cpp's build hits a
    # GGML_ASSERT and aborts its process (the llama.cpp child's, not the studio's)
    import transformers as tf

    if not llama_cpp.available():
        pytest.skip("cyllama is not installed")
    folder = sentencepiece_folder(tmp_path / "g3", "gemma3")
    config = tf.AutoConfig.from_pretrained(folder)
    config.num_hidden_layers, config.layer_types = 2, ["sliding_attention"] * 2
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    handle = run(open_model_job(folder))
    variant = run(quantize_job(handle, Plan(QuantSpec(8, 32, True)), None, None, "q8"))
    with pytest.raises(StudioError) as caught:
        run(export_job(variant, handle, "gguf", tmp_path / "out"))
    assert "does not run in llama.cpp" in str(caught.value)
    assert "GGML_ASSERT" in str(caught.value) and "SIGABRT" in str(caught.value)
    assert not (tmp_path / "out").exists()
