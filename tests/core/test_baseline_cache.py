"""The baseline's side of an evaluation, computed once: identical figures from the cache,
recomputed when the text, the protocol or the model changes, damaged files ignored."""
import copy

import pytest
import torch

from studio.core import baseline_cache, metrics
from studio.core import evaluate as evaluation
from studio.core.baseline_cache import BaselineSummary
from studio.core.evaluate import evaluate_job, evaluate_many_job
from studio.core.jobs import run
from studio.core.plan import QuantSpec
from studio.core.quant.grid import fake_quant
from studio.core.text import builtin_text

SEQLEN, WINDOWS = 24, 2


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    baseline_cache.clear_memory()
    yield
    baseline_cache.clear_memory()


@pytest.fixture(scope="module")
def damaged(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    for info in tiny_llama.quantizable:
        w = model.get_submodule(info.name).weight
        w.data = fake_quant(w.data, QuantSpec(bits=3, group_size=-1))
    return model


def text(tmp_path, content=None, name="eval.txt"):
    path = tmp_path / name
    path.write_text(content or builtin_text()[:6000], encoding="utf-8")
    return path


def figures(result):
    data = result.to_dict(token_view=True)
    data.pop("seconds")
    data.pop("baseline_cache")
    return data


def measure(handle, model, path, seqlen=SEQLEN, windows=WINDOWS, baseline=None):
    return run(evaluate_job(model, baseline or handle.model, handle.tokenizer, path, seqlen,
                            windows))


def test_a_hit_gives_identical_figures_from_memory_and_from_disk(tiny_llama, damaged, tmp_path):
    path = text(tmp_path)
    first = measure(tiny_llama, damaged, path)
    assert first.baseline_cache == "computed" and first.kl > 1e-4 and first.top1 < 1
    files = list(baseline_cache.cache_folder().glob("*.safetensors"))
    assert len(files) == 1
    assert not list(baseline_cache.cache_folder().glob(".*"))   # no temporary left behind
    again = measure(tiny_llama, damaged, path)
    assert again.baseline_cache == "hit" and figures(again) == figures(first)
    baseline_cache.clear_memory()                               # a new session: from disk
    from_disk = measure(tiny_llama, damaged, path)
    assert from_disk.baseline_cache == "hit" and figures(from_disk) == figures(first)
    # The baseline evaluated with the variant: its own figures from the summary.
    many = run(evaluate_many_job({"base": tiny_llama.model, "damaged": damaged},
                                 tiny_llama.model, tiny_llama.tokenizer, path, SEQLEN, WINDOWS))
    assert figures(many["damaged"]) == figures(first)
    assert many["base"].kl == 0.0 and many["base"].top1 == 1.0
    assert many["base"].ppl == pytest.approx(first.base_ppl, rel=1e-12)


def test_a_hit_runs_no_baseline_forward(tiny_llama, damaged, tmp_path):
    path = text(tmp_path)
    measure(tiny_llama, damaged, path)
    calls = []
    hook = tiny_llama.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert measure(tiny_llama, damaged, path).baseline_cache == "hit"
    finally:
        hook.remove()
    assert calls == []


def test_text_protocol_and_model_changes_compute_again(tiny_llama, damaged, tmp_path,
                                                       monkeypatch):
    path = text(tmp_path)
    reference = measure(tiny_llama, damaged, path)
    # Same file name, other words: the window ids differ.
    other_text = text(tmp_path, builtin_text()[6000:12000])
    assert measure(tiny_llama, damaged, other_text).baseline_cache == "computed"
    path = text(tmp_path, builtin_text()[:6000])
    assert measure(tiny_llama, damaged, path).baseline_cache == "hit"
    # Another seqlen or window count.
    assert measure(tiny_llama, damaged, path, seqlen=20).baseline_cache == "computed"
    assert measure(tiny_llama, damaged, path, windows=1).baseline_cache == "computed"
    # A new field in the protocol record (say, a BOS choice) is part of the key by itself.
    plain = evaluation.protocol_record
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "protocol_record", lambda *a: {**plain(*a), "bos": True})
        with_bos = measure(tiny_llama, damaged, path)
    assert with_bos.baseline_cache == "computed" and with_bos.protocol["bos"] is True
    # Another baseline model, and the same model changed in place.
    twin = copy.deepcopy(tiny_llama.model)
    assert measure(tiny_llama, damaged, path, baseline=twin).baseline_cache == "hit"
    with torch.no_grad():
        twin.model.norm.weight.mul_(1.01)
    changed = measure(tiny_llama, damaged, path, baseline=twin)
    assert changed.baseline_cache == "computed"
    assert changed.base_ppl != reference.base_ppl


def test_a_damaged_cache_file_is_ignored_and_recomputed(tiny_llama, damaged, tmp_path):
    path = text(tmp_path)
    first = measure(tiny_llama, damaged, path)
    (file,) = baseline_cache.cache_folder().glob("*.safetensors")
    for garbage in (b"", b"not a safetensors file" * 10, file.read_bytes()[:200]):
        baseline_cache.clear_memory()
        file.write_bytes(garbage)
        again = measure(tiny_llama, damaged, path)
        assert again.baseline_cache == "computed"
        assert figures(again) == figures(first)


def test_writes_go_through_the_atomic_helper(tiny_llama, damaged, tmp_path, monkeypatch):
    written = []
    real = baseline_cache.write_bytes_atomic
    monkeypatch.setattr(baseline_cache, "write_bytes_atomic",
                        lambda p, data: (written.append(p), real(p, data)))
    measure(tiny_llama, damaged, text(tmp_path))
    assert len(written) == 1 and written[0].is_file()


def test_summary_kl_is_exact_over_a_small_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    vocab = 500
    ids = torch.randint(0, vocab, (2, 16))
    base = torch.randn(2, 16, vocab) * 3
    other = base + 0.3 * torch.randn(2, 16, vocab)
    exact = metrics.kl_divergence(base[:, :-1], other[:, :-1])
    full = BaselineSummary.from_logits(base, ids, k=vocab)
    assert torch.allclose(full.kl(other), exact, rtol=1e-4, atol=1e-6)
    assert torch.equal(full.nll, metrics.token_nll(base, ids))
    for k in (8, 64, 256):
        approx = BaselineSummary.from_logits(base, ids, k=k).kl(other)
        assert (approx <= exact + 1e-5).all()
    # With the default K, the coarse KL is within a few per cent of the full one.
    top = BaselineSummary.from_logits(base, ids).kl(other)
    assert top.sum() == pytest.approx(exact.sum().item(), rel=0.05)
