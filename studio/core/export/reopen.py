"""Open an export folder as a model, through the consumer's library, to measure it like any
other run (the Compare tab's "Add exported model", the export benchmark)."""
from __future__ import annotations

from pathlib import Path

from studio.core.errors import StudioError
from studio.core.files import read_json
from studio.core.jobs import Job


def read_report(path: str | Path) -> tuple[Path, dict]:
    """(export folder, its report.json) for an export folder or the .gguf inside one."""
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    report = read_json(folder / "report.json",
                       f"{folder} is not a Compression Studio export (it has no report.json).")
    if (not isinstance(report, dict) or not isinstance(report.get("format"), str)
            or not isinstance(report.get("file", ""), str)):
        raise StudioError(f"{folder / 'report.json'} is not an export report.")
    return folder, report


def open_export_job(path: str | Path) -> Job[tuple[object, dict]]:
    """(ModelHandle, report) of an export: a GGUF through transformers' GGUF loader, a folder
    through transformers (with compressed-tensors for its format)."""
    from studio.core.models import open_model_job

    folder, report = read_report(path)
    if report["format"] == "compressed-tensors":
        return (yield from _open_compressed_tensors(folder)), report
    target = folder
    if report["format"] == "gguf":
        target = folder / Path(report["file"]).name  # the folder may have moved since
        if not target.is_file():
            raise StudioError(f"{target.name} is missing from {folder}.")
    handle = yield from open_model_job(target)
    return handle, report


def is_export_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path.parent if path.is_file() else path).joinpath("report.json").is_file()


def export_eval_job(path: str | Path, base_handle, text_path, seqlen: int, windows: int,
                    bos: str = "auto") -> Job[tuple[object, dict]]:
    """(EvalResult, report): the export's perplexity, and KL / top-1 against the base model,
    measured on the file as its consumer library reads it."""
    from studio.core.evaluate import evaluate_job

    handle, report = yield from open_export_job(path)
    result = yield from evaluate_job(handle.model, base_handle.model, base_handle.tokenizer,
                                     text_path, seqlen, windows, bos=bos)
    return result, report


def _open_compressed_tensors(folder: Path) -> Job[object]:
    """transformers' own open of such a folder keeps compressed modules (no float weight to
    list) or fails on asymmetric files (see compressed_tensors.py): open it the way the
    exporter's verification does. A model whose float32 weights would not fit (the weights
    mode's rule, as any open: `models.choose_streaming`) is opened streamed, each quantized
    layer de-compressed by compressed-tensors when it runs (`streamed_reload`): a 3B export
    would otherwise be 12.8 GB of float32 before the first window."""
    import time

    from studio.core.export.compressed_tensors import open_checkpoint_job
    from studio.core.export.streamed_reload import compressed_tensors_job
    from studio.core.layers import inventory
    from studio.core.models import (ModelHandle, check_folder, choose_streaming,
                                     load_tokenizer, weight_mode)

    started = time.perf_counter()
    # a folder from anywhere: checked as any model folder is (its memory only when held)
    check_folder(folder, memory=False)
    stream = choose_streaming(weight_mode(), folder, 4 * _config_params(folder))
    if not stream:
        check_folder(folder)
    job = compressed_tensors_job if stream else open_checkpoint_job
    reloaded = yield from job(folder, folder)
    tokenizer, why = load_tokenizer(folder)
    model = reloaded.model
    store = next((p.store for p in model.parameters() if hasattr(p, "store")), None)
    return ModelHandle(model=model, tokenizer=tokenizer, architecture=type(model).__name__,
                       model_type=model.config.model_type, source=str(folder), folder=folder,
                       layers=inventory(model), notes=[why] if why else [],
                       load_seconds=time.perf_counter() - started, store=store)


def _config_params(folder: Path) -> int:
    """The parameters the export's config describes (counted on the meta device)."""
    from transformers import AutoConfig

    from studio.core.model_build import skeleton
    from studio.core.models import check_layer_count

    # (read_config refuses a quantized checkpoint as a model to start from; this one is read)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    check_layer_count(config, folder.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return sum(p.numel() for p in skeleton(config).parameters())
