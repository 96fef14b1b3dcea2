"""GGUF exports over the shard size split as llama.cpp's gguf-split does (issue 17): files
NAME-0000i-of-0000N.gguf with the split keys, all metadata in the first, the tensors' bytes
those of the one-file export; llama.cpp opens the first file, finds the rest, and computes the
one-file export's logits; a missing part is refused; nothing is left when a file fails."""
import errno

import pytest
import torch
from gguf import GGUFReader

from studio.core.errors import Cancelled, StudioError
from studio.core.export import gguf_split, llama_cpp
from studio.core.export.base import ExportOptions
from studio.core.export.job import export_job, verify_windows
from studio.core.jobs import CancelToken, run
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from tests.core.test_export_streamed import never_whole, streamed_variant  # noqa: F401

pytestmark = pytest.mark.skipif(not llama_cpp.available(), reason="needs llama.cpp (cyllama)")

LIMIT = 40_000   # bytes: the tiny models' GGUF in several files, the embedding alone in one


@pytest.fixture(scope="module")
def held_variant(tiny_llama):
    return run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, True, "rtn")), None, None, "held"))


def tensors_of(paths):
    """name -> (file index, GGML type, bytes) of every tensor of the given files."""
    return {t.name: (i, t.tensor_type, bytes(t.data.tobytes()))
            for i, path in enumerate(paths) for t in GGUFReader(str(path)).tensors}


def test_a_streamed_variant_splits_as_gguf_split_and_runs_as_one_file(
        streamed_variant, tmp_path, monkeypatch):  # noqa: F811  (the imported fixture)
    handle, variant = streamed_variant
    never_whole(monkeypatch)
    one = run(export_job(variant, handle, "gguf", tmp_path / "one", ExportOptions()))
    split = run(export_job(variant, handle, "gguf", tmp_path / "split",
                           ExportOptions(shard_size=LIMIT)))
    assert one.verified and split.verified and split.logits_by == "llama.cpp"
    paths = sorted((tmp_path / "split").glob("*.gguf"))
    count = len(paths)
    assert count > 2 and split.file == str(paths[0])
    assert [p.name for p in paths] == [f"v-{i:05d}-of-{count:05d}.gguf"
                                       for i in range(1, count + 1)]
    assert any("ollama" in note.lower() for note in split.notes)
    readers = [GGUFReader(str(p)) for p in paths]
    whole = GGUFReader(one.file)
    for i, reader in enumerate(readers):
        assert reader.fields["split.no"].contents() == i
        assert reader.fields["split.count"].contents() == count
        assert reader.fields["split.tensors.count"].contents() == len(whole.tensors)
        if i:   # every key but the split's in the first file only
            assert set(reader.fields) - {"split.no", "split.count", "split.tensors.count"} \
                == {f for f in reader.fields if f.startswith("GGUF.")}
        sizes = [int(t.n_bytes) for t in reader.tensors]
        assert sum(sizes) <= LIMIT or len(sizes) == 1
    keys = {k for k in readers[0].fields if not k.startswith(("GGUF.", "split."))}
    assert keys == {k for k in whole.fields if not k.startswith("GGUF.")}
    # the same tensors in the same order and bytes, cut into files
    theirs, ours = tensors_of([one.file]), tensors_of(paths)
    assert list(theirs) == list(ours)
    assert all(theirs[n][1:] == ours[n][1:] for n in theirs)
    assert sorted({ours[n][0] for n in ours}) == list(range(count))
    # llama.cpp opens the first file, finds the rest, and computes what the one file does
    windows = verify_windows(handle)
    assert torch.equal(llama_cpp.logits(paths[0], windows), llama_cpp.logits(one.file, windows))


def test_a_split_in_memory_variant_is_verified_by_llama_cpp(tiny_llama, held_variant,
                                                            tmp_path, monkeypatch):
    """transformers' GGUF loader reads one file: a split export of a variant in memory is read
    tensor by tensor from its files and run by llama.cpp instead."""
    never_whole(monkeypatch)
    result = run(export_job(held_variant, tiny_llama, "gguf", tmp_path / "out",
                            ExportOptions(shard_size=LIMIT)))
    assert result.verified and result.logits_by == "llama.cpp" and result.tokenizer_equal
    assert len(gguf_split.files(result.file)) > 2
    assert result.max_weight_diff <= 1e-3 and result.max_logit_diff < 1e-2
    # below the limit it stays one file, re-opened through transformers as before
    monkeypatch.undo()
    single = run(export_job(held_variant, tiny_llama, "gguf", tmp_path / "single",
                            ExportOptions()))
    assert [p.name for p in (tmp_path / "single").glob("*.gguf")] == ["held.gguf"]
    assert single.verified and "llama.cpp" not in single.logits_by


def test_without_llama_cpp_a_split_is_refused_before_work(tiny_llama, held_variant, tmp_path,
                                                          monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    with pytest.raises(StudioError, match=r"over the shard size \(40KB\).*only llama.cpp reads"):
        run(export_job(held_variant, tiny_llama, "gguf", tmp_path / "out",
                       ExportOptions(shard_size=LIMIT)))
    assert not list(tmp_path.iterdir())


def test_a_missing_or_wrong_part_is_named(tiny_llama, held_variant, tmp_path):
    result = run(export_job(held_variant, tiny_llama, "gguf", tmp_path / "out",
                            ExportOptions(shard_size=LIMIT)))
    paths = gguf_split.files(result.file)
    with pytest.raises(StudioError, match="part 2 of a GGUF.*open its first file"):
        gguf_split.files(paths[1])
    paths[-1].unlink()
    with pytest.raises(StudioError, match=f"{paths[-1].name} is missing"):
        gguf_split.files(paths[0])


def test_a_failed_or_cancelled_split_export_leaves_nothing(tiny_llama, held_variant, tmp_path,
                                                           monkeypatch):
    import gguf

    original = gguf.GGUFWriter.write_tensor_data
    written = []

    def fails_in_the_second_file(self, tensor, *args, **kwargs):
        file = next(i for i, tensors in enumerate(self.tensors) if tensors)
        if file == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(file)
        return original(self, tensor, *args, **kwargs)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fails_in_the_second_file)
    with pytest.raises(StudioError, match="No space left.*Nothing was changed"):
        run(export_job(held_variant, tiny_llama, "gguf", tmp_path / "out",
                       ExportOptions(shard_size=LIMIT)))
    assert written and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    token = CancelToken()
    seen = []

    def cancel_in_the_second_file(progress):
        seen.append(progress.message)
        if progress.message.startswith("Writing blk.1"):
            token.cancel()
    with pytest.raises(Cancelled):
        run(export_job(held_variant, tiny_llama, "gguf", tmp_path / "out",
                       ExportOptions(shard_size=LIMIT)), cancel_in_the_second_file, token)
    assert any(m.startswith("Writing blk.1") for m in seen)
    assert list(tmp_path.iterdir()) == []


def test_the_split_keys_are_llama_cpps():
    assert gguf_split.split_name("m", 0, 3) == "m-00001-of-00003.gguf"
    assert gguf_split.SPLIT_NAME.match("a-b-00002-of-00010.gguf")["prefix"] == "a-b"
    from gguf import Keys
    assert gguf_split.KEYS == (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT,
                               Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
