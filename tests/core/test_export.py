"""The export job, whatever the format: verification, reports, and never half-writing."""
import errno
import json

import pytest
import torch

from studio.core.errors import Cancelled, StudioError
from studio.core.export import format_names, get_format
from studio.core.export.base import ExportOptions
from studio.core.export.job import export_job
from studio.core.jobs import CancelToken, run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job


def _variant(handle, spec=QuantSpec(4, 32, False, "rtn")):
    return run(quantize_job(handle, Plan(spec), None, None, "rtn test"))


@pytest.fixture(scope="module")
def llama_variant(tiny_llama):
    return _variant(tiny_llama)


def test_every_format_is_declared_once():
    assert format_names() == ["gguf", "compressed-tensors", "hf"]
    for name in format_names():
        fmt = get_format(name)
        assert fmt.name == name and fmt.title and fmt.consumer
    with pytest.raises(StudioError, match="Unknown export format"):
        get_format("onnx")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_hf_export_reloads_to_the_variants_weights(tiny_dirs, tmp_path, arch):
    handle = run(open_model_job(tiny_dirs[arch]))
    variant = _variant(handle, QuantSpec(3, 32, arch != "opt", "rtn"))
    result = run(export_job(variant, handle, "hf", tmp_path / "out", ExportOptions(dtype="f32")))
    assert result.verified and result.tokenizer_equal
    # f32 holds scale * (code - zero) exactly: the reloaded weights are the variant's.
    assert result.max_weight_diff == 0.0
    assert result.max_logit_diff < 1e-3
    assert result.bits_per_weight_on_disk == 32.0
    assert all(layer["exact"] for layer in result.layers)
    assert len(result.layers) == len(variant.qtensors)
    folder = tmp_path / "out"
    report = json.loads((folder / "report.json").read_text())
    assert report["verified"] and report["format"] == "hf"
    assert report["bits_per_weight_estimate"] == pytest.approx(variant.bits_per_weight, abs=1e-3)
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["plan"]["default"]["bits"] == 3
    assert "AutoModelForCausalLM" in (folder / "README.md").read_text()


def test_hf_f16_export_reports_the_rounding_it_measured(tiny_llama, llama_variant, tmp_path):
    preflight = get_format("hf").preflight(llama_variant, tiny_llama, ExportOptions(dtype="f16"))
    assert all(t.stored_as == "F16" for t in preflight.targets)
    errors = [t.error for t in preflight.targets if not t.exact]
    assert errors and all(0 < e < 1e-6 for e in errors)   # fp16 rounding: tiny, not zero
    result = run(export_job(llama_variant, tiny_llama, "hf", tmp_path / "out"))
    assert result.verified
    assert 0 < result.max_weight_diff < 1e-3
    assert result.bits_per_weight_on_disk == 16.0


def test_an_existing_target_is_kept_unless_forced(tiny_llama, llama_variant, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(StudioError, match="already exists"):
        run(export_job(llama_variant, tiny_llama, "hf", out))
    assert (out / "mine.txt").read_text() == "keep me"
    run(export_job(llama_variant, tiny_llama, "hf", out, force=True))
    assert not (out / "mine.txt").exists() and (out / "report.json").is_file()


def test_cancel_half_way_leaves_nothing(tiny_llama, llama_variant, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p)
        if "Comparing" in p.message:   # written and reloaded: cancel during verification
            token.cancel()

    with pytest.raises(Cancelled):
        run(export_job(llama_variant, tiny_llama, "hf", out, force=True), progress, token)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]   # no temporary left behind


def test_a_full_disk_leaves_the_target_as_it_was(tiny_llama, llama_variant, tmp_path,
                                                 monkeypatch):
    fmt = get_format("hf")
    real = fmt.write_job

    def full_disk(*args):
        yield from real(*args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt, "write_job", full_disk)
    with pytest.raises(StudioError, match="No space left on device"):
        run(export_job(llama_variant, tiny_llama, "hf", tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_leftovers_are_removed_next_time(tiny_llama, llama_variant, tmp_path):
    stale = tmp_path / ".out.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    run(export_job(llama_variant, tiny_llama, "hf", tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_input_is_refused_before_any_work(tiny_dirs, tiny_llama, llama_variant, tmp_path):
    qwen = run(open_model_job(tiny_dirs["qwen2"]))
    with pytest.raises(StudioError, match="made from a LlamaForCausalLM"):
        run(export_job(llama_variant, qwen, "hf", tmp_path / "out"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StudioError, match="Cannot write"):
        run(export_job(llama_variant, tiny_llama, "hf", blocker / "sub" / "out"))
    with pytest.raises(StudioError, match="float type"):
        ExportOptions(dtype="f8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_verification_writes_nothing(tiny_llama, llama_variant, tmp_path, monkeypatch):
    fmt = get_format("hf")
    real = fmt.reload_job

    def corrupted(written, handle):
        reloaded = yield from real(written, handle)
        with torch.no_grad():
            reloaded.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        return reloaded

    monkeypatch.setattr(fmt, "reload_job", corrupted)
    with pytest.raises(StudioError, match="did not verify.*down_proj"):
        run(export_job(llama_variant, tiny_llama, "hf", tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
