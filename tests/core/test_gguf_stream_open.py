"""A GGUF whose model will be streamed is de-quantized tensor by tensor into its cache (issue
17): the weights are the in-memory first open's bit for bit (llama's q/k permutation undone,
Gemma's norm + 1, a tied head left out), the model opens streamed from the cache, a cancel
leaves no folder, and the guard's estimate follows the largest tensors, not the model."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.core import gguf_fast, memory
from studio.core.errors import NotEnoughMemory
from studio.core.export.base import ExportOptions
from studio.core.export.gguf import GGUF
from studio.core.export.safetensors_stream import TensorSpec, Writer
from studio.core.file_checks import GGUFSummary, GGUFTensorInfo, gguf_summary
from studio.core.jobs import run
from studio.core.models import gguf_cache_folder, open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job


def tiny_gguf(folder, out):
    handle = run(open_model_job(folder))
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True)), None, None,
                               f"stream {folder.name}"))
    return run(GGUF.write_job(variant, handle, ExportOptions(dtype="f16"), None, out)).file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_the_streamed_first_open_writes_the_in_memory_weights(family_dirs, tmp_path, cache,
                                                              monkeypatch, arch):
    file = tiny_gguf(family_dirs[arch], tmp_path)
    in_memory = run(gguf_fast.dequantize_job(file)).tensors   # what the demo's path builds on
    monkeypatch.setattr(gguf_fast, "dequantize_job",
                        lambda *a: pytest.fail("the streamed first open read the model whole"))
    # every matrix de-quantized a few rows at a time, as a 3B model's embedding is
    monkeypatch.setattr(gguf_fast, "CHUNK_ELEMENTS", 100)
    handle = run(open_model_job(file, weights="stream"))
    assert handle.streamed and handle.folder == gguf_cache_folder(file)
    cached = load_file(handle.folder / "model.safetensors")
    assert list(cached) == sorted(in_memory)   # a tied head has no tensor of its own
    assert all(cached[k].dtype == torch.float32 and torch.equal(cached[k], in_memory[k])
               for k in cached)
    # the model reads those weights from the folder, and its tokenizer is the GGUF's
    assert torch.equal(handle.weight(handle.quantizable[0].name),
                       in_memory[handle.quantizable[0].name + ".weight"])
    assert handle.tokenizer is not None


def test_a_cancelled_streamed_first_open_leaves_no_cache(tiny_dirs, tmp_path, cache):
    file = tiny_gguf(tiny_dirs["llama"], tmp_path)
    job = open_model_job(file, weights="stream")
    while "Tensor 3 of" not in next(job).message:
        pass
    assert list((cache / "gguf").iterdir())    # the folder being written, under a temporary name
    job.close()                                # what a cancel does
    assert not list((cache / "gguf").iterdir())
    assert run(open_model_job(file, weights="stream")).streamed   # and a new open completes


def test_the_writer_takes_tensors_in_any_order_and_writes_what_save_file_writes(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, dtype=torch.float16)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    specs = {k: TensorSpec.of(v) for k, v in tensors.items()}
    with Writer(tmp_path / "put.safetensors", specs, {"format": "pt"}) as out:
        for key in ("c", "a", "b"):
            out.put(key, tensors[key])
    assert (tmp_path / "put.safetensors").read_bytes() == \
        (tmp_path / "reference.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not written, e.g. b"), \
            Writer(tmp_path / "short.safetensors", specs) as out:
        out.put("a", tensors["a"])
    with pytest.raises(ValueError, match="declared"):
        Writer(tmp_path / "wrong.safetensors", specs).put("a", tensors["b"])


def test_the_streamed_estimate_follows_the_largest_tensors_not_the_model():
    def streamed(elements):
        tensors = [GGUFTensorInfo(f"t{i}", (n,), 1, 2 * n) for i, n in enumerate(elements)]
        return memory.estimate_convert(GGUFSummary(3, tensors, {}, 0), 0, "x", True,
                                       streamed=True).parts[
            "the tensors being de-quantized and written"]

    per = 4 + 4 + 2   # in flight: float32 result, an intermediate as large, its F16 bytes
    assert streamed([1000] * 4) == streamed([1000] * 400) == 4 * 1000 + 2 * per * 1000
    # the one being written, then the next two in flight
    assert streamed([10, 1000, 10, 10]) == max(4 * 10 + per * (1000 + 10), per * (10 + 1000))
    # a tensor above the chunk size is de-quantized a block of rows at a time
    huge = 4 * memory.DEQUANTIZE_CHUNK
    assert streamed([huge]) == 4 * huge + 3 * 4 * memory.DEQUANTIZE_CHUNK


def test_the_streamed_first_open_is_guarded_by_its_own_estimate(family_dirs, tmp_path, cache,
                                                                monkeypatch):
    """On a model of many tensors (the tiny Qwen2 with its head) the streamed estimate is
    below the model's float32 size; the open asks for that figure, not the in-memory one."""
    file = tiny_gguf(family_dirs["qwen2"], tmp_path)
    summary = gguf_summary(file)
    size = file.stat().st_size
    streamed = memory.estimate_convert(summary, size, "x", True, streamed=True)
    whole = memory.estimate_convert(summary, size, "x", True)
    largest = max(t.n_elements for t in summary.tensors)
    part = streamed.parts["the tensors being de-quantized and written"]
    assert part <= 4 * largest + 2 * (8 * largest + max(t.nbytes for t in summary.tensors))
    assert part < 4 * summary.param_count < whole.added
    monkeypatch.setattr(memory, "available", lambda: streamed.added - 1)
    with pytest.raises(NotEnoughMemory, match="tensor by tensor into its cache needs about"):
        run(open_model_job(file, weights="stream"))
    assert not (cache / "gguf").exists() or not list((cache / "gguf").iterdir())
    monkeypatch.setattr(memory, "available", lambda: streamed.added + 2**20)
    assert run(open_model_job(file, weights="stream")).streamed


def test_a_cache_disk_too_small_is_refused_before_work(tiny_dirs, tmp_path, cache, monkeypatch):
    import shutil
    from collections import namedtuple

    from studio.core.errors import ModelLoadError

    file = tiny_gguf(tiny_dirs["llama"], tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(gguf_fast, "convert_fast_job", lambda *a: pytest.fail("work started"))
    with pytest.raises(ModelLoadError, match=r"writes its weights in float32 to the cache "
                                             r"first: .* GiB, but only 0.0 GiB is free"):
        run(open_model_job(file, weights="stream"))
