"""A GGUF split into parts (llama.cpp's gguf-split files, as the studio's own export writes
them) opens as one model (issue 17): the first file's metadata, the tensors of every part,
through the same fast de-quantizing path and cache as one file; any part picked, or the folder,
opens it; a missing or foreign part is refused before any tensor is read, naming the file; the
CLI's inspect / eval / quantize take it; an export split into files evaluates as one."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.cli import main
from studio.core import gguf_fast, gguf_parts
from studio.core.errors import ModelLoadError
from studio.core.export import llama_cpp
from studio.core.export.base import ExportOptions
from studio.core.export.job import export_job
from studio.core.export.reopen import export_eval_job, open_export_job
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job

pytestmark = pytest.mark.skipif(not llama_cpp.available(), reason="needs llama.cpp (cyllama)")

LIMIT = 40_000   # bytes: the tiny Llama's GGUF in three files


@pytest.fixture(scope="module")
def variant(tiny_llama):
    return run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, True, "rtn")), None, None, "v"))


@pytest.fixture(scope="module")
def ggufs(tiny_llama, variant, tmp_path_factory):
    """(the one-file export, the split export's files)."""
    root = tmp_path_factory.mktemp("split-open")
    one = run(export_job(variant, tiny_llama, "gguf", root / "one", ExportOptions()))
    split = run(export_job(variant, tiny_llama, "gguf", root / "split",
                           ExportOptions(shard_size=LIMIT)))
    files = gguf_parts.parts(Path(split.file))
    assert len(files) == 3
    return Path(one.file), files


def copied(files, folder):
    folder.mkdir()
    return [Path(shutil.copy2(file, folder / file.name)) for file in files]


def reads(monkeypatch):
    """The GGUF files whose tensors the de-quantizer reads, in order, as they are read."""
    seen = []
    original = gguf_fast.read_tensors_job

    def recorded(path, *args, **kwargs):
        tables = args[3] if len(args) > 3 else kwargs.get("tables")
        seen.extend(file.name for file, *_ in tables or gguf_parts.tensor_tables(path))
        return original(path, *args, **kwargs)
    monkeypatch.setattr(gguf_fast, "read_tensors_job", recorded)
    return seen


def test_a_split_gguf_opens_as_its_one_file_does(ggufs, tmp_path, monkeypatch):
    one, files = ggufs
    files = copied(files, tmp_path / "split")
    seen = reads(monkeypatch)
    whole = run(open_model_job(one))
    split = run(open_model_job(files[0]))
    assert seen == ["v.gguf"] + [f.name for f in files]   # the fast path, every part read
    ours, theirs = split.model.state_dict(), whole.model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert [i.name for i in split.layers] == [i.name for i in whole.layers]
    text = "the quick brown fox"
    assert split.tokenizer(text)["input_ids"] == whole.tokenizer(text)["input_ids"]
    assert any("and its 2 other parts" in note for note in split.notes)
    # a second open is the cached folder's; any part, or the folder, stands for the model
    for source in (files[0], files[2], tmp_path / "split"):
        again = run(open_model_job(source))
        assert again.folder == split.folder and again.source == str(files[0])
    assert len(seen) == 4


def test_a_split_gguf_opens_streamed_from_its_cache(ggufs, tmp_path, monkeypatch):
    """Written into its cache tensor by tensor from every part, not read whole (issue 17)."""
    one, files = ggufs
    files = copied(files, tmp_path / "split")
    whole = run(open_model_job(one)).model.state_dict()
    monkeypatch.setattr(gguf_fast, "dequantize_job",
                        lambda *a: pytest.fail("the streamed first open read the model whole"))
    split = run(open_model_job(files[0], weights="stream"))
    assert split.streamed
    cached = load_file(split.folder / "model.safetensors")
    assert cached and all(torch.equal(cached[key], whole[key]) for key in cached)


def test_a_missing_or_foreign_part_is_refused_before_work(ggufs, tmp_path, monkeypatch):
    _one, files = ggufs
    first, second, third = copied(files, tmp_path / "split")
    seen = reads(monkeypatch)
    run(open_model_job(first))   # cached: the refusals below come from the parts, not the cache
    shutil.move(third, tmp_path / "kept.gguf")
    with pytest.raises(ModelLoadError, match=f"{third.name} is missing"):
        run(open_model_job(first))
    # the third part put where the second belongs: its keys say which part it is
    shutil.copy2(tmp_path / "kept.gguf", third)
    shutil.copy2(third, second)
    with pytest.raises(ModelLoadError, match=f"{second.name} does not belong to {first.name}: "
                                             f"its split keys say part 3 of 3, where part 2"):
        run(open_model_job(first))
    # the first file gone: a later part names it
    shutil.copy2(files[1], second)
    first.unlink()
    with pytest.raises(ModelLoadError, match=f"its first file, {first.name}, .*is missing"):
        run(open_model_job(third))
    assert len(seen) == 3   # only the first open read tensors


def test_the_split_header_is_checked_part_by_part(ggufs, tmp_path):
    _one, files = ggufs
    first, second, _third = copied(files, tmp_path / "split")
    summary = gguf_parts.summary(first)
    assert len(summary.tensors) == summary.keys["split.tensors.count"]
    with open(second, "r+b") as f:   # the second part cut short
        f.truncate(second.stat().st_size - 100)
    with pytest.raises(ModelLoadError, match=f"{second.name} is truncated"):
        gguf_parts.summary(first)


def test_the_cli_inspects_evaluates_and_quantizes_a_split_gguf(ggufs, tmp_path, capsys):
    one, files = ggufs
    assert main(["inspect", str(files[0]), "--json"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(one), "--json"]) == 0
    assert split["layers"] == json.loads(capsys.readouterr().out)["layers"]
    args = ["--windows", "2", "--seqlen", "32", "--json"]
    assert main(["eval", str(files[0].parent), *args]) == 0
    ppl = json.loads(capsys.readouterr().out)["ppl"]
    assert main(["eval", str(one), *args]) == 0
    assert ppl == json.loads(capsys.readouterr().out)["ppl"]
    assert main(["quantize", str(files[1]), "--method", "rtn", "--bits", "4", "--group-size",
                 "32", "--out", str(tmp_path / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_weight"] > 4


@pytest.mark.parametrize("fmt", ["gguf", "compressed-tensors", "hf"])
def test_an_export_split_into_files_evaluates_as_the_one_file(tiny_llama, variant, ggufs, fmt,
                                                              tmp_path, monkeypatch):
    """What Compare's "add an exported model" and `eval EXPORT` run: the split export's
    perplexity and KL are the one-file export's; streamed (as a model too large to hold is
    read back), the same figures."""
    limit = {"gguf": LIMIT, "compressed-tensors": 30_000, "hf": 30_000}[fmt]
    if fmt == "gguf":
        one, split = ggufs[0].parent, ggufs[1][0].parent
    else:
        run(export_job(variant, tiny_llama, fmt, tmp_path / "one", ExportOptions()))
        run(export_job(variant, tiny_llama, fmt, tmp_path / "split",
                       ExportOptions(shard_size=limit)))
        one, split = tmp_path / "one", tmp_path / "split"
        assert len(list(split.glob("*.safetensors"))) > 1
    ours, report = run(export_eval_job(split, tiny_llama, None, 32, 2))
    theirs, _ = run(export_eval_job(one, tiny_llama, None, 32, 2))
    assert report["format"] == fmt
    assert (ours.ppl, ours.kl, ours.top1) == (theirs.ppl, theirs.kl, theirs.top1)
    if fmt != "gguf":   # (a GGUF is de-quantized into its cached folder, held)
        monkeypatch.setenv("COMPRESSION_STUDIO_WEIGHTS", "stream")
        handle, _ = run(open_export_job(split))
        assert handle.streamed
        streamed, _ = run(export_eval_job(split, tiny_llama, None, 32, 2))
        assert (streamed.ppl, streamed.kl) == (theirs.ppl, theirs.kl)
