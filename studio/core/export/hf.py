"""A plain Hugging Face checkpoint of the variant's de-quantized weights: any tool opens it.

Quantized layers are written as scale * (code - zero) in the chosen float type (exact in f32;
rounded once to the type otherwise, and the preflight measures that rounding per layer).
SmoothQuant's activation quantization is a runtime behaviour, not a weight: a plain checkpoint
cannot carry it, and the preflight says so.
"""
from __future__ import annotations

from pathlib import Path

import torch

from studio.core import metrics
from studio.core.export import shards
from studio.core.export.base import ExportFormat, ExportOptions, LayerTarget, Preflight, Written
from studio.core.export.hf_folder import copy_tokenizer_files, export_config, reload_folder_job
from studio.core.export.safetensors_stream import TensorSpec
from studio.core.export.tensors import TORCH_DTYPES, dense_weight, float_state, float_value
from studio.core.jobs import Job, Progress
from studio.core.layers import get_module, is_conv1d

PROGRESS_EVERY = 16   # tensors between progress reports while writing


class HfFormat(ExportFormat):
    name = "hf"
    title = "Hugging Face checkpoint (de-quantized)"
    description = ("config.json + model.safetensors (shards and their index above the shard "
                   "size) with the de-quantized weights in f16, bf16 or f32, and the source's "
                   "tokenizer files: opens in any tool.")
    consumer = "transformers"
    splits_as = ("model-00001-of-0000N.safetensors and model.safetensors.index.json, "
                 "as transformers splits a checkpoint")

    def preflight(self, variant, handle, options: ExportOptions) -> Preflight:
        target = TORCH_DTYPES[options.dtype]
        targets = []
        for name, qt in variant.qtensors.items():
            w = qt.dequantize()
            error = metrics.relative_error(w, w.to(target))
            targets.append(LayerTarget(name, options.dtype.upper(), exact=error == 0.0,
                                       error=None if error == 0.0 else error,
                                       note="" if error == 0.0 else
                                       f"de-quantized weights rounded to {options.dtype}"))
        notes = [f"The weights are stored de-quantized in {options.dtype}: the file is a float "
                 f"model, {2 if options.dtype != 'f32' else 4} bytes per weight."]
        if variant.act_bits:
            notes.append("SmoothQuant's per-token activation quantization is not part of a plain "
                         "checkpoint: the file holds the smoothed, quantized weights only "
                         "(use compressed-tensors to keep W8A8).")
        return Preflight(targets, notes=notes)

    def write_job(self, variant, handle, options: ExportOptions, preflight: Preflight,
                  folder: Path) -> Job[Written]:
        """The weights written a tensor at a time (`shards.write`), each quantized layer
        de-quantized when its file reaches it: a streamed variant is never gathered (a 3B
        model would be 6 GiB of f16), and the files are those `save_pretrained` writes from
        the same tensors (tied ones once), split into shards of at most `options.shard_size`
        bytes."""
        float_type = TORCH_DTYPES[options.dtype]
        floats = float_state(variant)
        specs = {key: TensorSpec(float_type if value.is_floating_point() else value.dtype,
                                 tuple(value.shape)) for key, value in floats.items()}
        for name, qt in variant.qtensors.items():
            shape = tuple(qt.shape)
            if is_conv1d(get_module(handle.model, name)):   # GPT-2 stores [in, out]
                shape = shape[::-1]
            specs[f"{name}.weight"] = TensorSpec(float_type, shape)

        def produce(key: str) -> torch.Tensor:
            if key in floats:
                return float_value(floats[key], float_type)
            return dense_weight(variant, handle, key.removesuffix(".weight")).to(float_type)

        units = shards.state_units(specs)
        total = len(specs)
        yield Progress(0, total + 1, "Writing the weights")
        for done, key in enumerate(shards.write(folder, specs, units, produce,
                                                options.shard_size, parameter_count(specs),
                                                {"format": "pt"}), start=1):
            if done % PROGRESS_EVERY == 0:
                yield Progress(done, total + 1, f"Writing {key}")
        config = export_config(variant.model, float_type)
        config.architectures = [type(variant.model).__name__]   # as save_pretrained sets it
        config.save_pretrained(folder)
        if variant.model.can_generate():   # as save_pretrained writes it (the source's wins)
            variant.model.generation_config.save_pretrained(folder)
        copy_tokenizer_files(Path(handle.folder), folder)
        size = {"f16": 2, "bf16": 2, "f32": 4}[options.dtype]
        layer_bytes = {name: qt.numel() * size for name, qt in variant.qtensors.items()}
        yield Progress(total + 1, total + 1, "Written")
        return Written(file=folder, layer_bytes=layer_bytes)

    def reload_job(self, written: Written, handle) -> Job:
        if getattr(handle, "streamed", False):   # re-opened whole it would be float32
            from studio.core.export.streamed_reload import checkpoint_job
            return (yield from checkpoint_job(written.file, Path(handle.folder)))
        return (yield from reload_folder_job(written.file, Path(handle.folder), "checkpoint"))

    def usage(self, file: str) -> str:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained('path/to/this/folder')")


HF = HfFormat()


def parameter_count(specs: dict[str, TensorSpec]) -> int:
    """The index's `total_parameters`: every value the checkpoint holds (tied ones once)."""
    import math

    return sum(math.prod(spec.shape) for spec in specs.values())
