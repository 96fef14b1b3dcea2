"""What the folder formats (plain Hugging Face, compressed-tensors) share: the tokenizer files
carried over byte for byte, the config, and reloading through transformers."""
from __future__ import annotations

import copy
import filecmp
import shutil
from pathlib import Path

import torch

from studio.core.errors import StudioError
from studio.core.export.base import Reloaded
from studio.core.jobs import Job, Progress

# Files a model folder's tokenizer and generation defaults live in (transformers' names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def copy_tokenizer_files(source: Path, folder: Path) -> list[str]:
    """Copy the source folder's tokenizer files; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied


def tokenizer_files_equal(source: Path, folder: Path) -> tuple[bool | None, str]:
    """Whether every tokenizer file of the source is in the export, byte for byte."""
    names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    if not names:
        return None, "the source has no tokenizer files"
    differ = [n for n in names
              if not (folder / n).is_file() or not filecmp.cmp(source / n, folder / n, False)]
    if differ:
        return False, f"differ from the source: {', '.join(differ)}"
    return True, f"{len(names)} files equal to the source's ({', '.join(names)})"


def export_config(model, dtype: torch.dtype):
    """A copy of the model's config for the exported folder (the model's own is not touched)."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    for stale in ("quantization_config", "_name_or_path"):
        if hasattr(config, stale):
            delattr(config, stale)
    return config


def reload_folder_job(folder: Path, source: Path, what: str, **load_kwargs) -> Job[Reloaded]:
    """Open an exported folder with transformers (as any user of it would) in float32."""
    from transformers import AutoModelForCausalLM

    yield Progress(0, 1, f"Re-opening the {what} with transformers")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     trust_remote_code=False, **load_kwargs)
    except Exception as exc:  # whatever transformers raises: the export is not loadable
        raise StudioError(f"transformers could not load the exported {what}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    equal, detail = tokenizer_files_equal(source, folder)
    yield Progress(1, 1, f"Re-opened the {what}")
    return Reloaded(model=model, tokenizer_equal=equal, tokenizer_detail=detail)
