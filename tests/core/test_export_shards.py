"""Safetensors exports split into shards as transformers splits a checkpoint (issue 17): the
same split as huggingface_hub, the files `save_pretrained` writes, an index that names every
tensor, shards transformers re-opens, and nothing left behind when a shard fails."""
import errno
import json
import random

import pytest
import torch
from safetensors import safe_open

from studio.core.errors import StudioError
from studio.core.export import safetensors_stream, shards
from studio.core.export.base import ExportOptions
from studio.core.export.job import export_job
from studio.core.export.safetensors_stream import TensorSpec
from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from tests.core.test_export_streamed import never_whole, streamed_variant  # noqa: F401

LIMIT = 30_000   # bytes: the tiny Llama's f16 export in several shards, its embedding alone


@pytest.fixture(scope="module")
def symmetric_variant(tiny_llama):
    return run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, True, "rtn")), None, None, "sym"))


def tensors_of(folder):
    """key -> (file name, tensor) of every safetensors file in `folder`."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                out[key] = (file.name, handle.get_tensor(key))
    return out


def test_the_split_is_huggingface_hubs():
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    rng = random.Random(0)
    for trial in range(20):
        sizes = {f"t{i:03d}": rng.choice([2, 4]) * rng.randint(1, 400)
                 for i in range(rng.randint(1, 40))}
        limit = rng.randint(100, 1200)
        specs = {k: TensorSpec(torch.float16 if n % 4 else torch.float32,
                               (n // (2 if n % 4 else 4),)) for k, n in sizes.items()}
        theirs = split_state_dict_into_shards_factory(
            {k: s.nbytes for k, s in specs.items()}, get_storage_size=lambda n: n,
            filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
        ours = shards.plan(specs, [[k] for k in specs], limit)
        assert ours == theirs.filename_to_tensors, trial


def test_a_shard_size_reads_as_transformers_reads_it():
    assert shards.parse_size("5GB") == 5 * 10 ** 9 == shards.DEFAULT_SHARD_SIZE
    assert shards.parse_size("2GiB") == 2 * 2 ** 30
    assert shards.parse_size("1.5 mb") == 1_500_000
    assert shards.parse_size(4096) == shards.parse_size("4096") == 4096
    assert shards.describe_size(5 * 10 ** 9) == "5GB" and shards.describe_size(4097) == "4097 bytes"
    for bad in ("5 parsecs", "-3GB", "0", ""):
        with pytest.raises(StudioError, match="shard size"):
            shards.parse_size(bad)
    with pytest.raises(StudioError, match="shard size"):
        ExportOptions(shard_size=0)


def test_a_plain_export_in_shards_is_what_save_pretrained_writes(tiny_llama, symmetric_variant,
                                                                 tmp_path):
    from studio.core.export.tensors import dense_weight, float_tensors

    variant = symmetric_variant
    result = run(export_job(variant, tiny_llama, "hf", tmp_path / "out",
                            ExportOptions(dtype="f16", shard_size=LIMIT)))
    assert result.verified   # re-opened by transformers' from_pretrained from the shards
    out = tmp_path / "out"
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert result.options["shard_size"] == "30KB"

    # the same tensors, tied ones sharing storage, through save_pretrained
    floats, converted, state = float_tensors(variant), {}, {}
    for key in tiny_llama.model.state_dict():
        module = key.rpartition(".")[0]
        if module in variant.qtensors and key.endswith(".weight"):
            state[key] = dense_weight(variant, tiny_llama, module).half()
        elif key in floats:
            state[key] = converted.setdefault(floats[key].data_ptr(), floats[key].half())
    reference = tmp_path / "reference"
    tiny_llama.model.save_pretrained(reference, state_dict=state, max_shard_size=LIMIT)
    assert files == sorted(f.name for f in reference.glob("*.safetensors"))
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    index = "model.safetensors.index.json"
    assert (out / index).read_text() == (reference / index).read_text()


def test_compressed_tensors_shards_keep_a_layer_together(tiny_llama, symmetric_variant,
                                                         tmp_path):
    variant = symmetric_variant
    whole = run(export_job(variant, tiny_llama, "compressed-tensors", tmp_path / "whole",
                           ExportOptions(dtype="f16")))
    split = run(export_job(variant, tiny_llama, "compressed-tensors", tmp_path / "split",
                           ExportOptions(dtype="f16", shard_size=LIMIT)))
    assert whole.verified and split.verified   # transformers + compressed-tensors re-open
    one, many = tensors_of(tmp_path / "whole"), tensors_of(tmp_path / "split")
    assert {f for f, _ in one.values()} == {"model.safetensors"}
    assert len({f for f, _ in many.values()}) > 2
    assert one.keys() == many.keys()
    for key, (_, tensor) in one.items():   # byte-identical tensors
        assert tensor.dtype == many[key][1].dtype and torch.equal(tensor, many[key][1]), key
    index = json.loads((tmp_path / "split" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {key: f for key, (f, _) in many.items()}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for _, t in many.values())
    assert index["metadata"]["total_parameters"] == sum(
        p.numel() for p in tiny_llama.model.parameters())
    for layer in variant.qtensors:   # codes, scales and shape of a layer in one file
        assert len({f for key, (f, _) in many.items()
                    if key.rpartition(".")[0] == layer}) == 1, layer
    by_file = {}
    for key, (f, t) in many.items():
        by_file.setdefault(f, []).append(t.numel() * t.element_size())
    for f, sizes in by_file.items():   # at most the limit, but a lone large unit
        assert sum(sizes) <= LIMIT or len(sizes) <= 4, f


def test_a_shard_that_fails_leaves_nothing(tiny_llama, symmetric_variant, tmp_path,
                                           monkeypatch):
    """A full disk in the second shard: no export folder, no temporary, an error that says
    nothing was changed."""
    original = safetensors_stream.write
    calls = []

    def second_fails(path, specs, produce, metadata=None):
        calls.append(path.name)
        for i, key in enumerate(original(path, specs, produce, metadata)):
            if len(calls) == 2 and i == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield key
    monkeypatch.setattr(safetensors_stream, "write", second_fails)
    for fmt in ("hf", "compressed-tensors"):
        calls.clear()
        with pytest.raises(StudioError, match="No space left.*Nothing was changed"):
            run(export_job(symmetric_variant, tiny_llama, fmt, tmp_path / fmt,
                           ExportOptions(shard_size=LIMIT)))
        assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["hf", "compressed-tensors"])
def test_a_streamed_variant_exports_in_shards_verified_a_layer_at_a_time(
        streamed_variant, fmt, tmp_path, monkeypatch):  # noqa: F811  (the imported fixture)
    handle, variant = streamed_variant
    never_whole(monkeypatch)
    whole = run(export_job(variant, handle, fmt, tmp_path / "whole", ExportOptions()))
    split = run(export_job(variant, handle, fmt, tmp_path / "split",
                           ExportOptions(shard_size=LIMIT)))
    assert whole.verified and split.verified
    assert split.max_weight_diff == whole.max_weight_diff
    assert split.max_logit_diff == whole.max_logit_diff
    one, many = tensors_of(tmp_path / "whole"), tensors_of(tmp_path / "split")
    assert len({f for f, _ in many.values()}) > 2 and one.keys() == many.keys()
    for key, (_, tensor) in one.items():
        assert torch.equal(tensor, many[key][1]), key
