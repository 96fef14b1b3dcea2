"""A plain Hugging Face checkpoint of the variant's de-quantized weights: any tool opens it.

Quantized layers are written as scale * (code - zero) in the chosen float type (exact in f32;
rounded once to the type otherwise, and the preflight measures that rounding per layer).
SmoothQuant's activation quantization is a runtime behaviour, not a weight: a plain checkpoint
cannot carry it, and the preflight says so.
"""
from __future__ import annotations

from pathlib import Path

from studio.core import metrics
from studio.core.export.base import ExportFormat, ExportOptions, LayerTarget, Preflight, Written
from studio.core.export.hf_folder import copy_tokenizer_files, export_config, reload_folder_job
from studio.core.export.tensors import TORCH_DTYPES, dense_state_dict
from studio.core.jobs import Job, Progress


class HfFormat(ExportFormat):
    name = "hf"
    title = "Hugging Face checkpoint (de-quantized)"
    description = ("config.json + model.safetensors with the de-quantized weights in f16, bf16 "
                   "or f32, and the source's tokenizer files: opens in any tool.")
    consumer = "transformers"

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
        yield Progress(0, 2, "De-quantizing the weights")
        state = dense_state_dict(variant, handle, options.dtype)
        yield Progress(1, 2, "Writing model.safetensors")
        config = export_config(variant.model, TORCH_DTYPES[options.dtype])
        original = variant.model.config
        try:  # save_pretrained writes the model's own config: give it the export's for the call
            variant.model.config = config
            variant.model.save_pretrained(folder, state_dict=state)
        finally:
            variant.model.config = original
        copy_tokenizer_files(Path(handle.folder), folder)
        size = {"f16": 2, "bf16": 2, "f32": 4}[options.dtype]
        layer_bytes = {name: qt.numel() * size for name, qt in variant.qtensors.items()}
        yield Progress(2, 2, "Written")
        return Written(file=folder, layer_bytes=layer_bytes)

    def reload_job(self, written: Written, handle) -> Job:
        return reload_folder_job(written.file, Path(handle.folder), "checkpoint")

    def usage(self, file: str) -> str:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained('path/to/this/folder')")


HF = HfFormat()
