"""Sessions on disk: an exact round trip, and refusals of corrupt, newer, hostile and
moved-model sessions."""
import json
import shutil

import numpy as np
import pytest
import torch

from studio.core.activations import activation_capture_job
from studio.core.errors import StudioError
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.quantize import quantize_job
from studio.core.sensitivity import sensitivity_job
from studio.core.session import Session
from studio.core.session_file import (ModelMoved, autosave, autosave_path, end_run,
                                      open_session_job, save_session, start_run)
from studio.core.stats import weight_stats_job
from studio.core.text import text_windows


def same(a, b, path="") -> None:
    """Deep equality of restored results: dataclasses field by field, arrays exactly."""
    import dataclasses

    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def model_dir(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("session-model") / "llama"
    shutil.copytree(tiny_dirs["llama"], folder)
    return folder


@pytest.fixture(scope="module")
def session(model_dir):
    handle = run(open_model_job(model_dir))
    windows = text_windows(handle.tokenizer, None, 16, 4, seed=0)[0]
    s = Session(handle=handle, plan=Plan(QuantSpec(3, 64), (Rule("lm_head", QuantSpec(8)),),
                                         handle.architecture))
    s.results["weight_stats"] = run(weight_stats_job(handle))
    s.results["activations"] = run(activation_capture_job(handle, None, windows=2, seqlen=16))
    s.results["sensitivity"] = run(sensitivity_job(handle, windows, bits=(2, 4),
                                                   group_sizes=(32,), kl_bits=(4,),
                                                   kl_group=32, kl_windows=2))
    s.results["exports"] = [{"format": "gguf", "seconds": np.float32(1.5), "ok": True}]
    s.results["current_variant"] = "gptq"
    calib = text_windows(handle.tokenizer, None, 64, 8, seed=0)[0]
    s.variants["gptq"] = run(quantize_job(handle, Plan(QuantSpec(4, 32, method="gptq")),
                                          calib, "built-in", "gptq"))
    s.runs.append({"kind": "eval", "ppl": 12.5, "tokens": 64, "kl": None})
    return s


def test_round_trip_restores_plans_variants_and_results_exactly(session, tmp_path):
    saved = save_session(session, tmp_path / "a.session", {"tab": "Plan", "layer": "lm_head"})
    assert saved.skipped == []
    restored = run(open_session_job(tmp_path / "a.session"))
    back = restored.session
    assert restored.window == {"tab": "Plan", "layer": "lm_head"}
    assert back.plan == session.plan
    assert list(back.results) == list(session.results)
    for key in session.results:
        same(session.results[key] if key != "exports" else
             [{k: (v.item() if hasattr(v, "item") else v) for k, v in e.items()}
              for e in session.results[key]], back.results[key], key)
    assert back.runs == session.runs
    assert list(back.variants) == ["gptq"]
    v, w = session.variants["gptq"], back.variants["gptq"]
    assert w.plan == v.plan and w.specs == v.specs and w.layer_errors == v.layer_errors
    for name, qt in v.qtensors.items():
        assert torch.equal(qt.codes, w.qtensors[name].codes)
        assert torch.equal(qt.scale, w.qtensors[name].scale)
    ids = torch.arange(16)[None]
    assert torch.equal(v.model(ids).logits, w.model(ids).logits)


def test_session_and_variant_files_are_written_with_the_lock_free(session, tmp_path,
                                                                   monkeypatch):
    """safetensors' save_file holds the interpreter's lock while it copies and writes every
    tensor (the window stalled on the autosave of a GPTQ variant); the studio's writer
    (`safetensors_stream.save`) writes the same bytes from Python file writes, which release
    it."""
    import safetensors.torch
    from safetensors.torch import load_file, save_file

    def refused(*_a, **_k):
        raise AssertionError("safetensors' save_file holds the interpreter's lock")

    monkeypatch.setattr(safetensors.torch, "save_file", refused)
    save_session(session, tmp_path / "a.session")
    monkeypatch.undo()
    for file in (tmp_path / "a.session").rglob("*.safetensors"):
        again = tmp_path / "again.safetensors"
        save_file(load_file(file), str(again))
        assert again.read_bytes() == file.read_bytes(), file.name


def test_saving_again_reuses_unchanged_variants(session, tmp_path):
    path = tmp_path / "again.session"
    save_session(session, path)
    first = (path / "variants" / "gptq" / "quantized.safetensors").stat().st_ino
    save_session(session, path)  # e.g. the next autosave
    again = path / "variants" / "gptq" / "quantized.safetensors"
    assert again.stat().st_ino == first and again.stat().st_nlink == 1  # linked, old gone
    assert list(run(open_session_job(path)).session.variants) == ["gptq"]


def test_a_result_of_another_type_is_named_not_saved(session, tmp_path):
    class Opaque:
        pass

    s = Session(handle=session.handle, results={"mine": Opaque(), "ok": [1, 2]})
    saved = save_session(s, tmp_path / "b.session")
    assert saved.skipped and saved.skipped[0].startswith("mine")
    assert run(open_session_job(tmp_path / "b.session")).session.results == {"ok": [1, 2]}


def edit(path, change):
    doc = json.loads((path / "session.json").read_text())
    change(doc)
    (path / "session.json").write_text(json.dumps(doc))


def test_newer_corrupt_and_hostile_sessions_are_refused(session, tmp_path):
    path = tmp_path / "c.session"
    save_session(Session(handle=session.handle, results={"x": (1, 2)}), path)
    edit(path, lambda d: d.update(version=7))
    with pytest.raises(StudioError, match="newer Compression Studio.*version 7"):
        run(open_session_job(path))
    edit(path, lambda d: d.update(version=1, results={"x": {"__type__": "os:system",
                                                             "fields": {}}}))
    with pytest.raises(StudioError, match="not a result type"):
        run(open_session_job(path))
    edit(path, lambda d: d.update(results={"x": {"__dict__": [[1]]}}))
    with pytest.raises(StudioError, match="not a valid session"):
        run(open_session_job(path))
    from studio.core.sensitivity import ModelIdentity
    save_session(Session(handle=session.handle,
                         results={"id": ModelIdentity("A", ("x",), "f")}), path)
    assert run(open_session_job(path)).session.results["id"].layers == ("x",)
    edit(path, lambda d: d["results"]["id"]["fields"].update(layers={"__tuple__": [1]}))
    with pytest.raises(StudioError, match="ModelIdentity.layers is not"):
        run(open_session_job(path))
    (path / "session.json").write_text("{")
    with pytest.raises(StudioError, match="not valid JSON"):
        run(open_session_job(path))
    with pytest.raises(StudioError, match="not a session"):
        run(open_session_job(tmp_path))


def test_moved_model_asks_to_locate_it_and_other_weights_are_refused(session, tmp_path,
                                                                    tiny_dirs):
    model = tmp_path / "model"
    shutil.copytree(session.handle.folder, model)
    handle = run(open_model_job(model))
    path = tmp_path / "d.session"
    save_session(Session(handle=handle, plan=session.plan, results={"k": 1}), path)
    moved = tmp_path / "moved"
    model.rename(moved)
    with pytest.raises(ModelMoved) as info:
        run(open_session_job(path))
    assert info.value.source == str(model)
    restored = run(open_session_job(path, model=str(moved)))
    assert restored.session.results == {"k": 1} and "found at" in restored.notes[0]
    with pytest.raises(StudioError, match="not the model this session was saved with"):
        run(open_session_job(path, model=str(tiny_dirs["qwen2"])))


def test_autosave_and_crash_marker(session, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    assert start_run() is None                      # first start: nothing to restore
    autosave(Session(handle=session.handle, results={"k": 2}))
    # The process "crashes": its marker stays, holding a pid that no longer runs.
    (autosave_path().with_name("running.pid")).write_text("999999999")
    crashed = start_run()
    assert crashed == autosave_path()
    assert run(open_session_job(crashed)).session.results == {"k": 2}
    end_run()                                       # a clean exit
    assert start_run() is None
    end_run()


def test_autosaves_encode_each_published_result_once(session, tmp_path, monkeypatch):
    from studio.core.session_file import EncodeCache

    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    cache, steps = EncodeCache(), []
    results = {"weight_stats": session.results["weight_stats"], "k": (1, 2)}
    autosave(Session(handle=session.handle, results=dict(results)), None, cache, steps.append)
    assert cache.encoded == 2
    assert len(steps) >= len(results) + 2          # a step per result, the runs, the write
    # The next autosave, after a job published one new result: only that one is encoded...
    results["activations"] = session.results["activations"]
    autosave(Session(handle=session.handle, results=dict(results)), None, cache)
    assert cache.encoded == 3
    # ...and a result replaced by a new object is encoded again, not taken from the cache.
    results["k"] = (3, 4)
    autosave(Session(handle=session.handle, results=dict(results)), None, cache)
    assert cache.encoded == 4
    restored = run(open_session_job(autosave_path()))
    same(restored.session.results, results)
