"""The synthetic 3B model (`bench_large.py make`) as a llama.cpp-style GGUF, for measuring a
large GGUF's first open (issue 17): `python benchmarks/bench_large.py make-gguf`.

Written with gguf-py's GGUFWriter one tensor at a time (every tensor's info declared first,
then each tensor read from its bf16 shard, quantized and written), so making it holds one
tensor, not the model. Q8_0 for the matrices (gguf-py quantizes it in NumPy; ~3.4 GB), F32
for the norms, as llama.cpp's converter does. llama's q/k rows get llama.cpp's permutation
(`LlamaModel.permute`, /work/shared/notes/export-formats.md), which transformers' loader
undoes. The tokenizer keys are the demo GGUF's, copied field by field (its 49152 ids are a
subset of the 128256-row embedding, as in the synthetic folder). The llama3 rope scaling is
left out (llama.cpp would want a rope_freqs tensor): the weights are random, only the memory
and time of opening them are measured.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QUANT_ROWS = 4096   # rows quantized at once: bounds the float32 temporaries of the embedding


def make_gguf(folder: Path, out: Path) -> None:
    import gguf
    from safetensors import safe_open

    from studio.core.models import demo_gguf_path

    if out.is_file():
        print(f"{out} exists")
        return
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    add_model_keys(writer, config)
    copy_tokenizer_keys(writer, demo_gguf_path())
    plan = []   # (HF key, GGUF name, quantization type)
    for key in index:   # the index's order: embedding, blocks in order, final norm
        with safe_open(folder / index[key], "pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        base = names.get_name(key, try_suffixes=(".weight", ".bias"))
        kind = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.Q8_0
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(base, shape, np.dtype(np.float32), 4 * _numel(shape))
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(base, byte_shape, np.dtype(np.uint8), _numel(byte_shape),
                                   raw_dtype=kind)
        plan.append((key, base, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (key, base, kind) in enumerate(plan):
        with safe_open(folder / index[key], "pt") as f:
            weights = f.get_tensor(key).float().numpy()
        if base.endswith("attn_q.weight"):
            weights = permute(weights, config["num_attention_heads"], config["num_attention_heads"])
        elif base.endswith("attn_k.weight"):
            weights = permute(weights, config["num_attention_heads"], config["num_key_value_heads"])
        writer.write_tensor_data(quantize(weights, kind))
        print(f"{i + 1}/{len(plan)} {base}", flush=True)
        del weights
    writer.close()
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)")


def add_model_keys(writer, config: dict) -> None:
    import gguf

    writer.add_name("llama-3b-synthetic")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def copy_tokenizer_keys(writer, demo: Path) -> None:
    """Every `tokenizer.*` key of the demo GGUF, with its type."""
    import gguf

    reader = gguf.GGUFReader(demo)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if array else None)


def permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rotate-half rows to interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def quantize(weights: np.ndarray, kind) -> np.ndarray:
    from gguf.quants import quantize as gguf_quantize

    if kind == 0:   # F32
        return np.ascontiguousarray(weights, dtype=np.float32)
    return np.concatenate([gguf_quantize(weights[i: i + QUANT_ROWS], kind)
                           for i in range(0, weights.shape[0], QUANT_ROWS)])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
