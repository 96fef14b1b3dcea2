"""Activation capture equals a manual computation; bad input is refused; the CLI writes JSON."""
import json

import numpy as np
import pytest
import torch

from studio.cli import main as cli_main
from studio.core.activations import activation_capture_job
from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, run
from studio.core.models import open_model_job
from studio.core.outliers import find_outliers, massive_activations, token_norm_profile
from studio.core.text import text_windows

WINDOWS, SEQLEN, SEED = 3, 32, 5


def _manual_inputs(handle, ids):
    """Every quantizable layer's full input, recorded by plain hooks, one window at a time
    (the capture batches windows: the numbers must not depend on that)."""
    seen = {info.name: [] for info in handle.quantizable}
    hooks = [handle.module(name).register_forward_pre_hook(
        lambda m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name in seen]
    try:
        with torch.inference_mode():
            hidden = [handle.model(input_ids=ids[i: i + 1], output_hidden_states=True,
                                   use_cache=False).hidden_states for i in range(len(ids))]
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}, hidden


@pytest.fixture(scope="module")
def capture(tiny_llama):
    return run(activation_capture_job(tiny_llama, None, WINDOWS, SEQLEN, SEED))


def test_capture_equals_manual_hooks(tiny_llama, capture):
    ids, _ = text_windows(tiny_llama.tokenizer, None, SEQLEN, WINDOWS, SEED)
    assert np.array_equal(capture.token_ids, ids.numpy())
    inputs, hidden = _manual_inputs(tiny_llama, ids)
    for info in tiny_llama.quantizable:
        group = capture.input_of(info.name)
        x = inputs[info.name]
        np.testing.assert_allclose(group.absmax, x.abs().amax(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(group.mean_abs, x.abs().mean(0).numpy(), rtol=1e-4)
        assert group.tokens == WINDOWS * SEQLEN
        sampled = group.hist_counts.sum()  # a sample of the values, at most 64k per input
        assert 0 < sampled <= min(x.numel(), 1 << 16)
    # The residual stream: row 0 = embeddings, row i = output of block i-1. HF's last hidden
    # state has the final norm applied, so compare the rows before it.
    blocks = len(capture.stream_names) - 1
    for row in range(blocks):
        norms = np.stack([torch.linalg.vector_norm(h[row][0], dim=-1).numpy() for h in hidden])
        np.testing.assert_allclose(capture.stream_norm[row], norms, rtol=1e-4)
        peak = np.stack([h[row][0].abs().amax(-1).numpy() for h in hidden])
        np.testing.assert_allclose(capture.stream_max[row], peak, rtol=1e-5)


def test_layers_reading_the_same_input_share_one_record(capture):
    labels = [group.label for group in capture.inputs]
    assert labels[:4] == ["model.layers.0 q/k/v", "model.layers.0 o",
                          "model.layers.0 gate/up", "model.layers.0 down"]
    assert capture.inputs[0].layers == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    groups = find_outliers(capture, k=1.5)
    assert len(groups) == len(capture.inputs)
    for group, stats in zip(groups, capture.inputs):
        expected = np.nonzero(stats.absmax > 1.5 * np.median(stats.absmax))[0]
        assert sorted(group.channels.tolist()) == expected.tolist()


def test_massive_activation_is_found_at_its_token(capture):
    planted = capture.stream_max.copy()
    planted[2, 1, 7] = 1000 * np.median(planted[2])
    capture_with_spike = type(capture)(**{**capture.__dict__, "stream_max": planted})
    found = massive_activations(capture_with_spike, factor=100)
    spike = [m for m in found if (m.window, m.position) == (1, 7)]
    assert len(spike) == 1 and spike[0].rows == [2] and spike[0].row == 2
    assert spike[0].token == capture.token(1, 7)
    assert spike[0].ratio == pytest.approx(1000, rel=0.02)  # the spike moves the median a bit
    assert len(found) == len({(m.window, m.position) for m in found})  # one entry per token
    assert token_norm_profile(capture)["max"].shape == (capture.stream_norm.shape[0],)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"\x00\x01\x02binary" * 10, "binary"), (b"caf\xe9 au lait " * 50, "UTF-8"),
    (b"too short", "fewer than one window")])
def test_bad_calibration_text_is_refused(tiny_llama, tmp_path, content, message):
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(StudioError, match=message):
        run(activation_capture_job(tiny_llama, path, windows=2, seqlen=SEQLEN))


def test_bad_settings_are_refused(tiny_llama):
    with pytest.raises(StudioError, match="windows"):
        run(activation_capture_job(tiny_llama, None, windows=0))


def test_cancel_removes_every_hook(tiny_llama):
    token = CancelToken()
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks)  # noqa: E731
                        for m in tiny_llama.model.modules())
    before = hooks()

    def on_progress(p):
        if "Capturing" in p.message:
            token.cancel()
    with pytest.raises(Cancelled):
        run(activation_capture_job(tiny_llama, None, 4, SEQLEN), on_progress, token)
    assert hooks() == before


@pytest.mark.parametrize("arch, first", [("gpt2", "transformer.h.0 qkv"),
                                         ("opt", "model.decoder.layers.0 k/v/q"),
                                         ("qwen2", "model.layers.0 q/k/v"),
                                         ("gemma", "model.layers.0 q/k/v")])
def test_other_architectures(tiny_dirs, arch, first):
    handle = run(open_model_job(tiny_dirs[arch]))
    capture = run(activation_capture_job(handle, None, 2, 16))
    assert capture.inputs[0].label == first
    recorded = {name for group in capture.inputs for name in group.layers}
    assert recorded == {info.name for info in handle.quantizable}
    assert np.all(capture.stream_norm > 0)


def test_cli_analyze_writes_json(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "stats.json"
    status = cli_main(["analyze", str(tiny_dirs["llama"]), "--windows", "2", "--seqlen", "16",
                       "--k", "2", "--out", str(out), "--json"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert summary["out"] == str(out) and report["version"] == 1
    assert len([r for r in report["weights"]["layers"] if r["quantizable"]]) == summary["layers"]
    acts = report["activations"]
    assert acts["windows"] == 2 and acts["seqlen"] == 16 and acts["k"] == 2
    assert acts["outliers"][0]["input"] == "model.layers.0 q/k/v"


def test_cli_analyze_bad_input_exits_2(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "stats.json"
    assert cli_main(["analyze", str(tiny_dirs["llama"]), "--k", "0", "--out", str(out)]) == 2
    assert "positive" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli_main(["analyze", str(tiny_dirs["llama"]), "--calib", str(empty),
                     "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists()  # nothing half-computed is written
