"""Exports of a streamed variant written and verified a layer at a time (issue 17): the
streaming safetensors writer is save_file byte for byte, the verification re-opens the file
the streamed way (never whole), still fails a file that differs, and what it reads at once
does not grow with depth."""
import pytest
import torch

from studio.core import streaming
from studio.core.errors import StudioError
from studio.core.export.base import ExportOptions
from studio.core.export.job import export_job
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from tests.core.test_streaming import sharded

FORMATS = ("compressed-tensors", "gguf", "hf")


def test_the_streaming_writer_writes_what_save_file_writes(tmp_path):
    from safetensors.torch import save_file

    from studio.core.export import safetensors_stream as ss

    g = torch.Generator().manual_seed(0)
    tensors = {"model.layers.0.q.weight_packed": torch.randint(-9, 9, (6, 5), dtype=torch.int32,
                                                               generator=g),
               "model.layers.0.q.weight_scale": torch.randn(6, 2, generator=g).half(),
               "model.layers.0.q.weight_shape": torch.tensor([6, 40]),
               "model.norm.weight": torch.randn(7, generator=g),
               "a.bf": torch.randn(3, 3, generator=g).bfloat16(),
               "empty": torch.zeros(0), "codes": torch.zeros(5, dtype=torch.uint8),
               "signed": torch.ones(3, dtype=torch.int8), "d": torch.randn(2).double()}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    written = list(ss.write(tmp_path / "b.safetensors",
                            {k: ss.TensorSpec.of(v) for k, v in tensors.items()},
                            tensors.__getitem__, {"format": "pt"}))
    assert sorted(written) == sorted(tensors)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with pytest.raises(ValueError, match="declared"):   # a tensor that is not what was declared
        list(ss.write(tmp_path / "c.safetensors", {"x": ss.TensorSpec(torch.float32, (2,))},
                      lambda key: torch.zeros(3)))


@pytest.fixture(scope="module")
def streamed_variant(tmp_path_factory, tiny_tokenizer_obj):
    folder = sharded(tmp_path_factory.mktemp("streamed-export"), tiny_tokenizer_obj, 2, 64)
    handle = run(open_model_job(folder, "stream"))
    return handle, run(quantize_job(handle, Plan(QuantSpec(4, 32, True, "rtn")), None, None,
                                    "v"))


def never_whole(monkeypatch):
    """The whole-model re-openers fail the test if called."""
    from studio.core import gguf_convert
    from studio.core.export import compressed_tensors, hf

    def whole(*args, **kwargs):
        raise AssertionError("the export was re-opened whole")
    monkeypatch.setattr(compressed_tensors, "open_checkpoint_job", whole)
    monkeypatch.setattr(hf, "reload_folder_job", whole)
    monkeypatch.setattr(gguf_convert, "convert_job", whole)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_streamed_variant_is_verified_without_reopening_it_whole(streamed_variant, fmt,
                                                                   tmp_path, monkeypatch):
    handle, variant = streamed_variant
    never_whole(monkeypatch)
    result = run(export_job(variant, handle, fmt, tmp_path / "out", ExportOptions(dtype="f16")))
    # compressed-tensors holds the codes exactly; GGUF rounds these scales to fp16, a plain
    # checkpoint the de-quantized weights
    assert result.verified and result.max_weight_diff <= (0.0 if fmt == "compressed-tensors"
                                                          else 1e-3)
    assert len(result.layers) == len(variant.qtensors)
    assert result.max_logit_diff < 1e-2 and result.tokenizer_equal
    assert result.logits_by == ("llama.cpp" if fmt == "gguf" else "")


def break_one_layer(monkeypatch, fmt):
    """The writer changes one code (one weight, a plain checkpoint) of
    model.layers.1.mlp.down_proj."""
    if fmt == "gguf":
        from studio.core.export import gguf
        original = gguf.tensor_data

        def tampered(entry, *args):
            data = original(entry, *args)
            if entry.layer == "model.layers.1.mlp.down_proj":
                data = data.copy()
                data.reshape(-1)[-1] ^= 0x10   # a code of the last block
            return data
        monkeypatch.setattr(gguf, "tensor_data", tampered)
    elif fmt == "hf":
        from studio.core.export import hf
        original = hf.dense_weight

        def tampered(variant, handle, name):
            w = original(variant, handle, name)
            if name == "model.layers.1.mlp.down_proj":
                w = w.clone()
                w[0, 0] += w.abs().max()
            return w
        monkeypatch.setattr(hf, "dense_weight", tampered)
    else:
        from studio.core.export import compressed_tensors
        original = compressed_tensors.layer_local

        def tampered(qt, scheme, *args):
            local = original(qt, scheme, *args)
            if tuple(qt.shape) == (64, 128):   # down_proj's shape only
                local["weight_packed"] = local["weight_packed"].clone()
                local["weight_packed"][0, 0] ^= 1
            return local
        monkeypatch.setattr(compressed_tensors, "layer_local", tampered)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_streamed_verification_refuses_a_file_that_differs(streamed_variant, fmt, tmp_path,
                                                                monkeypatch):
    handle, variant = streamed_variant
    break_one_layer(monkeypatch, fmt)
    with pytest.raises(StudioError, match="did not verify.*down_proj"):
        run(export_job(variant, handle, fmt, tmp_path / "out", ExportOptions(dtype="f16")))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_exports_reads_do_not_grow_with_depth(tmp_path, tiny_tokenizer_obj, monkeypatch):
    """The most read from the files at once (writing and verifying) is the same for a 2- and
    an 8-block model of the same shapes."""
    never_whole(monkeypatch)
    peaks = {}
    for layers in (2, 8):
        folder = sharded(tmp_path, tiny_tokenizer_obj, layers, 64, f"depth{layers}")
        handle = run(open_model_job(folder, "stream"))
        variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True, "rtn")), None, None,
                                   "v"))
        for fmt in FORMATS:
            streaming.reset_peak()
            run(export_job(variant, handle, fmt, tmp_path / f"{fmt}-{layers}",
                           ExportOptions(dtype="f16")))
            peaks[fmt, layers] = streaming.peak_read_bytes()
    for fmt in FORMATS:
        assert 0 < peaks[fmt, 2] == peaks[fmt, 8], peaks


def test_large_float_tensors_are_converted_and_compared_in_chunks_alike(
        streamed_variant, tmp_path, monkeypatch):
    """The chunked conversion (GGUF), reads and comparison give the whole-tensor bytes and
    figures (the tiny model's tensors are below the chunk sizes unless they are made small)."""
    from studio.core.export import gguf, job

    handle, variant = streamed_variant
    whole = {fmt: run(export_job(variant, handle, fmt, tmp_path / f"whole-{fmt}",
                                 ExportOptions(dtype="bf16"))) for fmt in FORMATS}
    monkeypatch.setattr(gguf, "FLOAT_ROWS_ELEMENTS", 100)
    monkeypatch.setattr(job, "COMPARE_CHUNK", 100)
    for fmt in FORMATS:
        chunked = run(export_job(variant, handle, fmt, tmp_path / f"chunked-{fmt}",
                                 ExportOptions(dtype="bf16")))
        name = "v.gguf" if fmt == "gguf" else "model.safetensors"
        assert (tmp_path / f"whole-{fmt}" / name).read_bytes() == \
            (tmp_path / f"chunked-{fmt}" / name).read_bytes()
        assert chunked.max_float_diff == whole[fmt].max_float_diff
        assert chunked.layers == whole[fmt].layers


def test_a_streamed_variants_size_figures_read_no_codes(streamed_variant, monkeypatch):
    """The export's report asks for the variant's sizes: from the layers' shapes, never every
    layer's codes decoded at once (a 3B model's took ~3 GiB)."""
    from studio.core import variant_stream

    _, variant = streamed_variant
    expected = (variant.size_bytes, variant.model_bits_per_weight, variant.bits_per_weight)

    def no_reads(*args):
        raise AssertionError("codes were read for a size figure")
    monkeypatch.setattr(variant_stream, "read_layer", no_reads)
    assert (variant.size_bytes, variant.model_bits_per_weight) == expected[:2]
    assert variant.size_breakdown["quantized"] > 0


def test_the_guard_counts_the_gguf_llama_cpp_maps(streamed_variant, tmp_path, monkeypatch):
    """A streamed GGUF's logits come from llama.cpp in its own process, which maps the whole
    file: the guard counts the file's tensors (sized before writing, exactly) and that
    process's runtime beside the studio's own peak."""
    from gguf import GGUFReader

    from studio.core import memory
    from studio.core.export import get_format
    from studio.core.export.gguf import llama_cpp_runtime

    handle, variant = streamed_variant
    fmt, options = get_format("gguf"), ExportOptions(dtype="f16")
    runtime = fmt.runtime_bytes(variant, handle, options, fmt.preflight(variant, handle, options))
    seen = []
    original = memory.estimate_job
    monkeypatch.setattr(memory, "estimate_job", lambda *a, **k: seen.append(
        original(*a, **k)) or seen[-1])
    result = run(export_job(variant, handle, "gguf", tmp_path / "out", options))
    tensors = sum(int(t.n_bytes) for t in GGUFReader(result.file).tensors)
    assert runtime - llama_cpp_runtime(variant.model) == tensors
    assert seen[0].parts["the consumer's own process"] == runtime
