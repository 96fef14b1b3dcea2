"""compressed-tensors checkpoints (vLLM, transformers): the variant's own codes, packed.

Weight-only layers are "pack-quantized", layers whose inputs SmoothQuant quantizes are
"int-quantized" with per-token dynamic activations, and a file holding both is
"mixed-precision". Every distinct stored scheme is one config group naming its layers exactly,
so a mixed plan survives. The layout (tensors, packing, config) is in `ct_layout`.

Exact by construction: codes and zeros are the variant's bits, scales are written in the
export's float type where it holds them exactly and in float32 otherwise, and a group size
that does not divide a layer is re-expressed at gcd(group, width). A quantized embedding is
the one thing no consumer loads (vLLM quantizes linear layers only; transformers 5.24 fails to
initialise a compressed Embedding): it is refused, or written de-quantized under "nearest".
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.quant.formats import export_problems
from studio.core.export.base import (ExportFormat, ExportOptions, LayerTarget, Preflight,
                                     Reloaded, Written)
from studio.core.export.ct_layout import (PACKED, Scheme, layer_tensors, quantization_config,
                                          scheme_for, zeros_are_codes)
from studio.core.export.hf_folder import (copy_tokenizer_files, export_config, reload_folder_job,
                                          tokenizer_files_equal)
from studio.core.export import shards
from studio.core.export.safetensors_stream import TensorSpec
from studio.core.export.tensors import TORCH_DTYPES, float_state, float_value
from studio.core.jobs import Job, Progress
from studio.core.layers import get_module, is_conv1d, is_linear

PROGRESS_EVERY = 8         # layers between progress reports while packing
KEPT_BYTES = 1 << 22       # tensors up to this size are kept from the first pass, not remade
VLLM_PACKED_BITS = (4, 8)  # vLLM's weight-only (WNA16) kernels
VLLM_W8A8 = Scheme(8, None, True, 8)  # the one activation-quantized int scheme vLLM runs


class CompressedTensorsFormat(ExportFormat):
    name = "compressed-tensors"
    title = "compressed-tensors"
    description = ("A Hugging Face folder whose quantized layers keep the variant's integer "
                   "codes (pack-quantized; SmoothQuant W8A8 as int-quantized): loads in vLLM "
                   "and in transformers with compressed-tensors.")
    consumer = "transformers + compressed-tensors"
    splits_as = ("model-00001-of-0000N.safetensors and model.safetensors.index.json, "
                 "as transformers splits a checkpoint (a layer's tensors in one file)")

    def preflight(self, variant, handle, options: ExportOptions) -> Preflight:
        refused = export_problems(variant.qtensors, self.name)  # codebook / vector codes
        if refused:
            return Preflight([], problems=refused)
        float_type = TORCH_DTYPES[options.dtype]
        targets, problems, conv1d = [], [], []
        for name, qt in variant.qtensors.items():
            module = get_module(handle.model, name)
            if is_conv1d(module):
                conv1d.append(name)
            elif isinstance(module, nn.Embedding):
                # a tied embedding holding the lm_head's codes is not refused: the head keeps
                # them, and the embedding's copy differs from them by the float type's rounding
                if options.inexact == "refuse" and name not in variant.shared:
                    problems.append(f"{name} is a quantized embedding, which neither vLLM nor "
                                    f"transformers loads from compressed-tensors; choose "
                                    f"'nearest' to store it de-quantized in {options.dtype}.")
                    continue
                w = qt.dequantize()
                error = metrics.relative_error(w, w.to(float_type))
                targets.append(LayerTarget(name, f"{options.dtype.upper()} (de-quantized)",
                                           exact=error == 0.0, error=error or None,
                                           note="embeddings cannot be stored quantized" + (
                                               f"; the codes of {variant.shared[name]}, tied"
                                               if name in variant.shared else "")))
            elif not isinstance(module, nn.Linear):
                problems.append(f"{name} is a {type(module).__name__}; compressed-tensors "
                                f"quantizes Linear layers only.")
            elif not zeros_are_codes(qt):
                problems.append(f"{name} has zero points that are not whole numbers from 0 to "
                                f"{2 ** qt.bits - 1}, which compressed-tensors cannot store.")
            else:
                scheme = layer_scheme(variant, name)
                if zero_point_bug(qt, scheme):
                    problems.append(f"{name} has only {qt.shape[0]} output rows: "
                                    f"compressed-tensors 0.20 cannot read the zero points of "
                                    f"a 4-bit layer that narrow; make it symmetric.")
                note = []
                if scheme.group_size not in (None, qt.group_size):
                    note.append(f"group {qt.group_size} does not divide {qt.shape[1]} inputs: "
                                f"stored as groups of {scheme.group_size}, scales repeated")
                if scale_dtype(qt, float_type) != float_type:
                    note.append(f"scales in f32 ({options.dtype} would round them)")
                targets.append(LayerTarget(name, scheme.describe(), exact=True,
                                           note="; ".join(note)))
        if conv1d:
            more = f" and {len(conv1d) - 1} more" if len(conv1d) > 1 else ""
            problems.append(f"GPT-2's layers ({conv1d[0]}{more}) are Conv1D modules, which "
                            f"compressed-tensors does not quantize (transformers would load "
                            f"them without weights); export this model as GGUF or a plain "
                            f"checkpoint.")
        if not problems and all(is_embedding(handle, t.name) for t in targets):
            problems.append("No layer would be stored quantized; export a plain checkpoint.")
        return Preflight(targets, problems=problems,
                         notes=self._notes(variant, handle, targets, options))

    def _notes(self, variant, handle, targets: list[LayerTarget],
               options: ExportOptions) -> list[str]:
        by_layer = {t.name: layer_scheme(variant, t.name) for t in targets
                    if not is_embedding(handle, t.name)}
        schemes = list(by_layer.values())
        notes = ["Load it with compressed-tensors >= 0.17 (older versions misread 3, 5, 6 and "
                 "7-bit packing) and transformers >= 5."]
        if getattr(handle, "streamed", False):
            notes.append("Verified the streamed way: the model transformers builds from the "
                         "export's config, run a layer at a time, each quantized layer "
                         "de-compressed from the file by compressed-tensors as it runs; every "
                         "weight and float tensor compared one at a time.")
        float_type = TORCH_DTYPES[options.dtype]
        f32 = [n for n in by_layer if scale_dtype(variant.qtensors[n], float_type) != float_type]
        if f32:
            notes.append(f"{len(f32)} layers keep float32 scales because {options.dtype} would "
                         f"round them (exact, 16 more bits per group); a consumer loading in "
                         f"{options.dtype} rounds them itself.")
        if any(s.format == PACKED and not s.symmetric for s in schemes):
            notes.append("transformers 5.24 with compressed-tensors 0.20 refuses asymmetric "
                         "pack-quantized files (it expects unpacked zero points: "
                         "llm-compressor#1618); vLLM loads them, and so does transformers with "
                         "CompressedTensorsConfig(dequantize=True) when the file has one scheme. "
                         "This export was verified with compressed-tensors' own de-compressor.")
        if any(s.act_bits for s in schemes):
            notes.append("Activation-quantized layers quantize their inputs per token at run "
                         "time. vLLM scales each token by max|x|/127 (8 bits), as the studio "
                         "does; transformers (compressed-tensors on CPU) uses max|x|/127.5 and "
                         "clamps to [-128, 127], so its logits differ slightly from the "
                         "studio's.")
        if any(s.act_bits and s != VLLM_W8A8 for s in schemes):
            notes.append("vLLM runs activation-quantized int layers only as W8A8 with 8-bit "
                         "symmetric per-channel weights; the others load in transformers only.")
        odd = sorted({s.bits for s in schemes if not s.act_bits} - set(VLLM_PACKED_BITS))
        if odd:
            notes.append(f"vLLM runs packed layers of 4 or 8 bits only: the "
                         f"{', '.join(map(str, odd))}-bit layers load in transformers only.")
        if split_fused(by_layer):
            notes.append("q/k/v (or gate/up) of a block have different schemes: vLLM fuses "
                         "them and needs one scheme; transformers loads the file.")
        for layer in handle.layers:
            if layer.tied_to and {layer.name, layer.tied_to} & set(variant.qtensors):
                notes.append(f"{layer.name} shares its weights with {layer.tied_to} in the "
                             f"source; as one of them is quantized, the file stores both.")
        return notes

    def write_job(self, variant, handle, options: ExportOptions, preflight: Preflight,
                  folder: Path) -> Job[Written]:
        """The weights written a tensor at a time (`shards.write`: model.safetensors, or
        shards of at most `options.shard_size` bytes and their index), in two passes
        over the layers: the first makes each layer's tensors to learn their dtypes and
        shapes (the header comes first) and keeps the small ones (scales, zero points,
        shapes: about 1/16 of the codes); the second makes each layer's packed codes again
        when the file reaches them. So a streamed variant's codes are read a layer at a time
        and never gathered (they would be ~1.5 GiB for a 3B model), and the file is byte for
        byte what `save_file` writes from the same tensors. A layer's tensors share a shard."""
        import compressed_tensors

        float_type = TORCH_DTYPES[options.dtype]
        names = list(variant.qtensors)
        floats = float_state(variant)
        specs = {key: TensorSpec(float_type if value.is_floating_point() else value.dtype,
                                 tuple(value.shape)) for key, value in floats.items()}
        schemes: dict[str, Scheme] = {}
        scale_types: dict[str, torch.dtype] = {}
        layer_bytes: dict[str, int] = {}
        numel: dict[str, int] = {}   # weights of each quantized layer (the index's count)
        kept: dict[str, torch.Tensor] = {}
        total = 2 * len(names) + 1
        for i, name in enumerate(names):
            if i % PROGRESS_EVERY == 0:
                yield Progress(i, total, f"Packing {name}")
            qt = variant.qtensors[name]
            if not is_embedding(handle, name):   # (an embedding is written de-quantized)
                schemes[name] = layer_scheme(variant, name, qt)
                scale_types[name] = scale_dtype(qt, float_type)
            local = layer_local(qt, schemes.get(name), scale_types.get(name), float_type)
            for key, value in local.items():
                specs[f"{name}.{key}"] = TensorSpec.of(value)
                if value.numel() * value.element_size() <= KEPT_BYTES:
                    # a copy: a small tensor may be a view that keeps the layer's decoded
                    # storage alive (~100 MB a block on the 3B, measured)
                    kept[f"{name}.{key}"] = value.clone()
            layer_bytes[name] = sum(t.numel() * t.element_size() for t in local.values())
            numel[name] = qt.numel()
            del qt, local
        made: dict[str, dict[str, torch.Tensor]] = {}   # the last layer made again

        def produce(key: str) -> torch.Tensor:
            if key in kept:
                return kept.pop(key)
            if key in floats:
                return float_value(floats[key], float_type)
            name, _, part = key.rpartition(".")
            if name not in made:
                made.clear()
                made[name] = layer_local(variant.qtensors[name], schemes.get(name),
                                         scale_types.get(name), float_type)
            return made[name][part]

        units = shards.state_units(specs, lambda key: layer if (layer := key.rpartition(".")[0])
                                   in schemes else None)
        parameters = sum(math.prod(specs[key].shape) for key in floats) + sum(numel.values())
        done = len(names)
        yield Progress(done, total, "Writing the weights")
        for key in shards.write(folder, specs, units, produce, options.shard_size, parameters,
                                {"format": "pt"}):
            name = key.rpartition(".")[0]
            if name in layer_bytes and key.endswith((".weight_packed", ".weight")):
                done += 1
                if done % PROGRESS_EVERY == 0:
                    yield Progress(min(done, total - 1), total, f"Writing {name}")
        made.clear()
        config = export_config(variant.model, float_type)
        if variant.shared:   # one tied matrix: stored quantized as the head, de-quantized as
            config.tie_word_embeddings = False   # the embedding (no other form loads)
        config.quantization_config = quantization_config(
            schemes, unquantized_linears(variant), compressed_tensors.__version__)
        config.save_pretrained(folder)
        copy_tokenizer_files(Path(handle.folder), folder)
        yield Progress(total, total, "Written")
        return Written(file=folder, layer_bytes=layer_bytes)

    def reload_job(self, written: Written, handle) -> Job[Reloaded]:
        if getattr(handle, "streamed", False):   # re-opened whole it would be float32
            from studio.core.export.streamed_reload import compressed_tensors_job
            return (yield from compressed_tensors_job(written.file, Path(handle.folder)))
        return (yield from open_checkpoint_job(written.file, Path(handle.folder)))

    def usage(self, file: str) -> str:
        return ("# transformers (compressed-tensors>=0.17, transformers>=5):\n"
                "from transformers import AutoModelForCausalLM, CompressedTensorsConfig\n"
                "model = AutoModelForCausalLM.from_pretrained('path/to/this/folder')\n"
                "# asymmetric layers, transformers 5.24 + compressed-tensors 0.20 (one scheme):\n"
                "# model = AutoModelForCausalLM.from_pretrained('path/to/this/folder',\n"
                "#     quantization_config=CompressedTensorsConfig(dequantize=True))\n"
                "# vLLM (GPU): vllm serve path/to/this/folder")


def layer_scheme(variant, name: str, qt=None) -> Scheme:
    qt = variant.qtensors[name] if qt is None else qt
    return scheme_for(qt, variant.specs[name].symmetric, variant.act_bits.get(name))


def layer_local(qt, scheme: Scheme | None, scales: torch.dtype | None,
                float_type: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's tensors by local name: packed as `scheme`, or (no scheme: an embedding)
    de-quantized in the export's float type, as the preflight said."""
    if scheme is None:
        return {"weight": qt.dequantize().to(float_type)}
    return layer_tensors(qt, scheme, scales)


def is_embedding(handle, name: str) -> bool:
    return isinstance(get_module(handle.model, name), nn.Embedding)


def scale_dtype(qt, float_type: torch.dtype) -> torch.dtype:
    """The export's float type if it holds every scale exactly, else float32."""
    exact = torch.equal(qt.scale.to(float_type).float(), qt.scale.float())
    return float_type if exact else torch.float32


def zero_point_bug(qt, scheme: Scheme) -> bool:
    """compressed-tensors 0.20 cannot unpack 4-bit zero points that fit in one row of words
    when there are several groups ("stride(-1) must be 1 to view Int as Byte")."""
    return (scheme.format == PACKED and not scheme.symmetric and scheme.bits == 4
            and scheme.group_size is not None and qt.shape[0] * 4 <= 32
            and qt.shape[1] > scheme.group_size)


def unquantized_linears(variant) -> list[str]:
    """Linear layers left in float: vLLM needs each of them in `ignore`."""
    return [name for name, module in variant.model.named_modules()
            if is_linear(module) and name not in variant.qtensors]


def split_fused(schemes: dict[str, Scheme]) -> bool:
    """Whether layers vLLM fuses (q/k/v, gate/up of one block) have different schemes."""
    fused = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    found: dict[tuple[str, int], set[Scheme]] = {}
    for name, scheme in schemes.items():
        parent, _, leaf = name.rpartition(".")
        for i, members in enumerate(fused):
            if leaf in members:
                found.setdefault((parent, i), set()).add(scheme)
    return any(len(kinds) > 1 for kinds in found.values())


# --- re-opening ------------------------------------------------------------------------------

def open_checkpoint_job(folder: Path, source: Path) -> Job[Reloaded]:
    """A compressed-tensors folder as its consumer libraries open it: a float32 model with its
    weights de-compressed (and inputs quantized where the file says so); the tokenizer files
    compared with `source`'s."""
    if packed_zero_points(folder):
        return (yield from decoded_reload_job(folder, source))
    reloaded = yield from reload_folder_job(folder, source, "compressed-tensors checkpoint")
    quantizer = getattr(reloaded.model, "hf_quantizer", None)
    if quantizer is None:
        raise StudioError("transformers loaded the export as a plain model: it did not read its "
                          "quantization_config.")
    yield Progress(0, 1, "De-compressing the weights with compressed-tensors")
    # What its hook does on the first forward, done now so the weights can be compared. The
    # modules keep their schemes: quantized inputs are still quantized when they run.
    quantizer.compressor.decompress_model(reloaded.model)
    return reloaded


def packed_zero_points(folder: Path) -> bool:
    """Whether the export holds packed zero points (asymmetric pack-quantized layers), which
    transformers 5.24 with compressed-tensors 0.20 cannot load: it gives those layers unpacked
    [out, groups] zero-point parameters, and its shape check refuses the file's."""
    from studio.core.files import read_json

    config = read_json(folder / "config.json", f"{folder} has no config.json.")
    try:
        groups = config["quantization_config"]["config_groups"].values()
        return any(group["format"] == PACKED and not group["weights"]["symmetric"]
                   for group in groups)
    except (KeyError, TypeError, AttributeError):
        raise StudioError(f"{folder / 'config.json'} has no valid compressed-tensors "
                          f"quantization_config.") from None


def decoded_reload_job(folder: Path, source: Path) -> Job[Reloaded]:
    """The export de-compressed by compressed-tensors' own model-free de-quantizer (each config
    group with its own scheme) into the transformers model its config describes, with
    compressed-tensors' activation quantization on the layers whose inputs it quantizes."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    yield Progress(0, 2, "De-compressing the export with compressed-tensors")
    # Scales in float32, as transformers' own path has them (the float32 model's parameters).
    tensors = {key: value.float() if key.endswith(".weight_scale") else value
               for file in shards.weight_files(folder) for key, value in load_file(str(file)).items()}
    try:
        decoder = CompressedTensorsDequantizer(folder, dtype=torch.float32)
        dense = decoder.validate(tensors)
    except Exception as exc:  # whatever it raises: the export does not decode
        raise StudioError(f"compressed-tensors could not de-compress the export: {exc}") from None
    yield Progress(1, 2, "Building the model with transformers")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    state = model.state_dict(keep_vars=True)
    loaded = {id(state[key]) for key in dense if key in state}
    missing = [key for key in missing if id(state[key]) not in loaded]  # tied copies are fine
    del tensors, dense, state  # the model holds its own copies
    if missing or unexpected:
        raise StudioError(f"The export does not match its model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}.")
    install_input_quantization(model, decoder.quant_config)
    model.eval()
    model.requires_grad_(False)
    equal, detail = tokenizer_files_equal(source, folder)
    yield Progress(2, 2, "Re-opened the compressed-tensors checkpoint")
    return Reloaded(model=model, tokenizer_equal=equal, tokenizer_detail=detail)


def install_input_quantization(model: nn.Module, quant_config) -> None:
    """compressed-tensors' dynamic activation quantization on the layers of the config groups
    that quantize inputs (their weights are de-compressed already)."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization)

    for group in quant_config.config_groups.values():
        if group.input_activations is not None:
            inputs_only = QuantizationScheme(targets=group.targets,
                                             input_activations=group.input_activations)
            for name in group.targets:
                initialize_module_for_quantization(model.get_submodule(name), inputs_only)


COMPRESSED_TENSORS = CompressedTensorsFormat()
