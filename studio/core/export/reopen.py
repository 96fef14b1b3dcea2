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

    from studio.core.models import check_folder

    folder, report = read_report(path)
    if report["format"] == "compressed-tensors":
        check_folder(folder)  # a folder from anywhere: checked as any model folder is
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
    exporter's verification does."""
    import time

    from studio.core.export.compressed_tensors import open_checkpoint_job
    from studio.core.layers import inventory
    from studio.core.models import ModelHandle, load_tokenizer

    started = time.perf_counter()
    reloaded = yield from open_checkpoint_job(folder, folder)
    tokenizer, why = load_tokenizer(folder)
    model = reloaded.model
    return ModelHandle(model=model, tokenizer=tokenizer, architecture=type(model).__name__,
                       model_type=model.config.model_type, source=str(folder), folder=folder,
                       layers=inventory(model), notes=[why] if why else [],
                       load_seconds=time.perf_counter() - started)
