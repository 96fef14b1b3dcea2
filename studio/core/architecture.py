"""Whether the studio can handle a model, decided from its config (or GGUF header) before any
weight is read, and saying what is missing when it cannot.

Loading a large model takes minutes; finding out afterwards that it is an encoder, needs its own
Python code, is already quantized, or has no stack of decoder blocks wastes them. Everything
here reads config.json (or a GGUF's key/value header) and, for the block check, builds the model
on PyTorch's meta device: the module tree with shapes and no storage, in about a second even
for a 7B model.
"""
from __future__ import annotations

from pathlib import Path

from studio.core.errors import ModelLoadError

# Encoder families whose causal-LM head only applies when the config says is_decoder.
ENCODERS = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "ernie", "camembert",
            "data2vec-text", "rembert", "roc_bert", "megatron-bert", "xmod", "big_bird"}
# GGUF architectures transformers' loader knows that are not causal LMs the studio can run.
GGUF_NOT_CAUSAL = {"general", "tokenizer", "t5", "umt5"}


def check_config(raw: dict, where: str) -> None:
    """Refuse a config.json the studio cannot open, naming what is missing."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(raw, dict):
        raise ModelLoadError(f"The config in {where} is not a JSON object.")
    model_type = raw.get("model_type")
    if not model_type:
        raise ModelLoadError(f"The config.json in {where} names no model type (its "
                             f"'model_type' key), so it is not a model the studio can open.")
    listed = raw.get("architectures") or []
    named = f"{model_type} model{f' ({chr(44).join(listed)})' if listed else ''}"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type in CONFIG_MAPPING_NAMES:
            raise ModelLoadError(f"{where} holds a {named}, which is not a causal language "
                                 f"model: it has no text-generating head this studio can run.")
        code = " Its config points to its own Python code (auto_map), which the studio does " \
               "not run." if raw.get("auto_map") else ""
        raise ModelLoadError(f"{where} holds a {named}: transformers {transformers.__version__} "
                             f"does not know the model type {model_type!r}.{code} A newer "
                             f"transformers may support it.")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if listed and not any(a in causal for a in listed) or \
            not listed and model_type in ENCODERS and raw.get("is_decoder") is not True:
        raise ModelLoadError(f"{where} holds a {named}, which is not a causal language model "
                             f"this studio can open.")
    quant = raw.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method") or "an unknown method"
        raise ModelLoadError(f"{where} holds weights already quantized with {method}; the "
                             f"studio needs the float (fp32/bf16/fp16) checkpoint to start from.")


def check_blocks(config, where: str) -> None:
    """Refuse a model with no stack of decoder blocks holding linear layers, from its module tree
    built on the meta device (no weights read, no memory taken)."""
    from studio.core.errors import StudioError
    from studio.core.layers import is_linear
    from studio.core.model_build import skeleton
    from studio.core.quant.blocks import decoder_blocks

    try:
        model = skeleton(config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ModelLoadError(f"The model in {where} cannot be built from its config: "
                             f"{exc}") from None
    try:
        _, blocks = decoder_blocks(model)
    except StudioError:
        raise ModelLoadError(f"{where} holds a {type(model).__name__}, which has no stack of "
                             f"decoder blocks (a ModuleList of layers) for the studio to analyse "
                             f"and quantize.") from None
    if not any(is_linear(m) for m in blocks[0].modules()):
        raise ModelLoadError(f"The decoder blocks of {type(model).__name__} ({where}) hold no "
                             f"linear layer the studio can quantize (nn.Linear or GPT-2's "
                             f"Conv1D).")


def check_gguf_architecture(path: Path) -> None:
    """Refuse a GGUF whose architecture transformers' GGUF loader cannot de-quantize."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from studio.core.gguf_header import read_keys

    try:
        arch = read_keys(path, {"general.architecture"}).get("general.architecture")
    except (OSError, ValueError):
        return  # the reader's own check reports a broken file
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in GGUF_NOT_CAUSAL]
    if arch is not None and arch not in readable:
        raise ModelLoadError(f"{path.name} holds a {arch!r} model, which transformers' GGUF "
                             f"loader cannot read (it reads {', '.join(readable)}). Open the "
                             f"model's original safetensors folder instead.")
