"""The quantization driver on tiny random models: plans, errors, cancel, bad input, folders."""
import json

import pytest
import torch

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.quantize import quantize_job
from studio.core.text import text_windows
from studio.core.variant import load_variant, save_variant


@pytest.fixture(scope="module")
def windows(tiny_llama):
    return text_windows(tiny_llama.tokenizer, None, 64, 12, 0)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snapshot):
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in snapshot.items())


def test_gptq_layer_error_below_rtn_on_the_same_inputs(tiny_llama, windows):
    ids, label = windows
    before = _snapshot(tiny_llama.model)
    variant = run(quantize_job(tiny_llama, Plan(QuantSpec(3, 32, False, "gptq")), ids, label,
                               "gptq"))
    assert _same(tiny_llama.model, before)
    quantizable = [layer.name for layer in tiny_llama.quantizable]
    assert sorted(variant.qtensors) == sorted(quantizable)
    assert variant.calibration == label
    for entry in variant.layer_errors:
        assert 0 < entry["error"] < entry["rtn_error"], entry
    # The variant's model holds exactly the de-quantized codes.
    for name, qt in variant.qtensors.items():
        assert torch.equal(variant.model.get_submodule(name).weight, qt.dequantize())
    assert 3 < variant.bits_per_weight < 4.5


def test_mixed_plan_quantizes_each_layer_as_specified(tiny_llama, windows):
    ids, label = windows
    plan = Plan(QuantSpec(4, 32, False, "rtn"), rules=(
        Rule(r".*\.mlp\..*", QuantSpec(3, 64, True, "gptq"), regex=True),
        Rule("model.layers.1.self_attn.o_proj", None),
        Rule("model.layers.0.self_attn.q_proj", QuantSpec(8, -1, False, "rtn")),
        Rule("lm_head", QuantSpec(8, -1, True, "rtn")),
    ), architecture=tiny_llama.architecture)
    before = _snapshot(tiny_llama.model)
    variant = run(quantize_job(tiny_llama, plan, ids, label, "mixed"))
    assert _same(tiny_llama.model, before)
    expected = {n: s for n, s in plan.resolve(tiny_llama.layers).items() if s is not None}
    # the tied embedding is the lm_head's matrix: it holds the same codes, stored once
    expected["model.embed_tokens"] = expected["lm_head"]
    assert set(variant.qtensors) == set(expected)
    assert "model.layers.1.self_attn.o_proj" not in variant.qtensors
    assert variant.qtensors["model.embed_tokens"] is variant.qtensors["lm_head"]
    for name, spec in expected.items():
        qt = variant.qtensors[name]
        assert variant.specs[name] == spec
        assert qt.bits == spec.bits
        width = qt.codes.shape[1]
        assert qt.group_size == (width if spec.group_size == -1 else min(spec.group_size, width))
    skipped = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(variant.model.state_dict()[skipped], before[skipped])
    # lm_head was tied to the embedding: the embedding looks its rows up in the same codes
    ids = torch.tensor([[3, 1, 300]])
    assert torch.equal(variant.model.model.embed_tokens(ids)[0],
                       variant.qtensors["lm_head"].dequantize()[ids[0]])
    assert not torch.equal(variant.model.lm_head.weight, before["model.embed_tokens.weight"])


@pytest.mark.parametrize("at", [6, 20])  # inside block 0; inside block 1, after block 0 is
@pytest.mark.parametrize("spec", [QuantSpec(3, 32, False, "gptq"),
                                  QuantSpec(8, -1, True, "smoothquant")])  # folds into norms
def test_cancel_leaves_the_baseline_bit_identical(tiny_llama, windows, at, spec):  # done
    ids, label = windows
    before = _snapshot(tiny_llama.model)
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == at:
            token.cancel()

    with pytest.raises(Cancelled):
        run(quantize_job(tiny_llama, Plan(spec), ids, label, "c"), progress, token)
    assert len(seen) == at
    assert _same(tiny_llama.model, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_finished_variant_holds_codes_and_shares_the_rest(tiny_dirs, arch):
    """Blocks are copied one at a time and hold codes until the end: the variant must come
    out with every quantized layer a CodedLinear (its weight exists only as codes), everything
    unchanged (a skipped block, GPTQ's untouched norms, biases) shared, and the baseline
    untouched."""
    from studio.core.layers import get_module, weight_matrix
    from studio.core.quant.coded import CodedLinear

    handle = run(open_model_job(tiny_dirs[arch]))
    ids, label = text_windows(handle.tokenizer, None, 32, 16, 0)
    before = _snapshot(handle.model)
    plan = Plan(QuantSpec(3, 32, False, "gptq"), rules=(Rule(r".*\.1\..*", None, True),))
    variant = run(quantize_job(handle, plan, ids, label, "v"))
    assert _same(handle.model, before)
    assert variant.qtensors and not any(".1." in n for n in variant.qtensors)
    for name, qt in variant.qtensors.items():
        mine = get_module(variant.model, name)
        assert isinstance(mine, CodedLinear) and mine.qt is qt, name
        assert torch.equal(weight_matrix(mine), qt.dequantize()), name
    base_params = dict(handle.model.named_parameters())
    quantized = {f"{n}.weight" for n in variant.qtensors}
    params = dict(variant.model.named_parameters())
    assert not quantized & set(params)          # no float copy of a quantized weight
    shared = [n for n, p in params.items() if p is base_params.get(n)]
    assert set(shared) == set(base_params) - quantized  # GPTQ changes nothing else


@pytest.mark.parametrize("make", [
    lambda h: Plan(QuantSpec(4, 128, False, "rtn"), rules=(Rule(r".*nothing.*", None, True),)),
    lambda h: Plan(QuantSpec(4, 128, False, "rtn"), rules=(Rule("model.layers.9.mlp", None),)),
    lambda h: Plan(QuantSpec(4, 128), architecture="GPT2LMHeadModel"),
    lambda h: Plan(None),
])
def test_bad_plans_fail_before_any_work(tiny_llama, windows, make):
    job = quantize_job(tiny_llama, make(tiny_llama), windows[0], windows[1], "bad")
    with pytest.raises(StudioError):
        next(job)  # the first step already refuses: nothing was copied or run


def test_bad_specs_and_short_calibration_are_refused(tiny_llama, windows):
    for kwargs in ({"bits": 1}, {"bits": 9}, {"group_size": 48}, {"group_size": 256},
                   {"method": "gptq", "options": {"dampening": 0.1}}):
        with pytest.raises(StudioError):
            QuantSpec(**kwargs)
    with pytest.raises(StudioError, match="calibration"):
        next(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, False, "gptq")), None, None, "x"))
    with pytest.raises(StudioError, match="tokens"):
        next(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, False, "awq")),
                          windows[0][:2, :64], "short", "x"))


def test_recipe_file_for_another_architecture_is_refused(tiny_llama, tmp_path):
    path = tmp_path / "plan.json"
    Plan(QuantSpec(4, 128), architecture="OPTForCausalLM").save(path)
    with pytest.raises(StudioError, match="OPTForCausalLM"):
        next(quantize_job(tiny_llama, Plan.load(path), None, None, "x"))


def test_rtn_needs_no_calibration(tiny_llama):
    variant = run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, True, "rtn")), None, None, "r"))
    assert variant.calibration is None and len(variant.qtensors) == len(tiny_llama.quantizable)
    assert all(e["error"] is None for e in variant.layer_errors)


def test_variant_folder_round_trip(tiny_llama, windows, tmp_path):
    ids, label = windows
    plan = Plan(QuantSpec(3, 32, False, "gptq"), rules=(
        Rule(r".*\.mlp\..*", QuantSpec(8, -1, True, "smoothquant"), regex=True),))
    variant = run(quantize_job(tiny_llama, plan, ids, label, "round trip"))
    assert variant.act_bits and variant.floats   # SmoothQuant folded scales into the norms
    folder = save_variant(variant, tmp_path / "v")
    meta = json.loads((folder / "variant.json").read_text())
    assert meta["name"] == "round trip" and meta["calibration"] == label
    assert Plan.load(folder / "recipe.json") == plan
    loaded = load_variant(folder, tiny_llama)
    assert loaded.act_bits == variant.act_bits
    with torch.no_grad():
        a = variant.model(ids[:2]).logits
        b = loaded.model(ids[:2]).logits
    assert torch.equal(a, b)
    for name, qt in variant.qtensors.items():
        assert torch.equal(loaded.qtensors[name].codes, qt.codes)
    assert loaded.to_summary()["size_bytes"] == variant.to_summary()["size_bytes"]


@pytest.mark.parametrize("arch", ["gpt2", "opt"])  # Conv1D weights; OPT's decoder layout
def test_other_architectures(tiny_dirs, arch):
    handle = run(open_model_job(tiny_dirs[arch]))
    ids, label = text_windows(handle.tokenizer, None, 32, 16, 0)
    variant = run(quantize_job(handle, Plan(QuantSpec(3, 32, False, "gptq")), ids, label, arch))
    assert len(variant.qtensors) == len(handle.quantizable)
    worse = [e for e in variant.layer_errors if not e["error"] < e["rtn_error"]]
    assert len(worse) <= 1, worse   # random tiny models: GPTQ wins essentially everywhere


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2", "opt"])
def test_replayed_block_parts_change_nothing(tiny_dirs, arch, monkeypatch):
    """Serving settled attention outputs from memory gives the very same variant as
    computing them again (float32 block runs, so both runs are deterministic)."""
    import contextlib

    from studio.core import quantize as driver
    from studio.core.quant.blocks import Replay

    handle = run(open_model_job(tiny_dirs[arch]))
    ids, label = text_windows(handle.tokenizer, None, 32, 16, 0)
    monkeypatch.setattr(driver, "FAST_DTYPE", None)
    served = []
    original = Replay.active

    def counting(self, batches, stop_at=None, record=True):
        served.append(len(self.recorded) + len(self.inputs))
        return original(self, batches, stop_at, record)

    monkeypatch.setattr(Replay, "active", counting)
    plan = Plan(QuantSpec(3, 32, False, "gptq"))
    fast = run(quantize_job(handle, plan, ids, label, "replay"))
    assert max(served) >= 1  # the attention part was served at least once
    # A budget too small for any recording: every stash declines, the parts are recomputed.
    declined = []
    stash = Replay.stash

    def watched(self):
        made = stash(self)
        declined.append(made)
        return made

    monkeypatch.setattr(Replay, "stash", watched)
    monkeypatch.setattr(driver, "REPLAY_SHARE", 1e-12)
    bounded = run(quantize_job(handle, plan, ids, label, "bounded"))
    assert any(s.declined for s in declined) and not any(s.buffer is not None for s in declined)
    monkeypatch.setattr(Replay, "active", lambda *args, **kwargs: contextlib.nullcontext())
    slow = run(quantize_job(handle, plan, ids, label, "recompute"))
    for name, qt in slow.qtensors.items():
        assert torch.equal(fast.qtensors[name].codes, qt.codes), name
        assert torch.equal(bounded.qtensors[name].codes, qt.codes), name


def test_tensors_outside_the_blocks_are_shared_only_when_untouched(tiny_llama, windows):
    ids, label = windows
    base = tiny_llama.model
    inside = run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, False, "awq")), ids, label, "a"))
    embed = base.get_input_embeddings().weight
    assert inside.model.get_input_embeddings().weight is embed          # shared, not copied
    assert inside.model.model.layers[0].input_layernorm.weight is not \
        base.model.layers[0].input_layernorm.weight                     # AWQ folds into these
    before = embed.clone()
    plan = Plan(QuantSpec(4, 32, False, "rtn"), rules=(Rule("model.embed_tokens",
                                                            QuantSpec(8, 32, False, "rtn")),))
    outside = run(quantize_job(tiny_llama, plan, None, None, "e"))
    assert outside.model.get_input_embeddings().weight is not embed
    assert torch.equal(embed, before)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoothquant_block_by_block_is_smoothing_the_whole_model_first(tiny_dirs, arch):
    """The job smooths each block just before quantizing it (so it copies one block at a
    time): the variant must be the reference's order of work, every block smoothed from the
    float model's activations first, then the weights rounded."""
    import copy

    from studio.core.layers import set_weight_matrix, weight_matrix
    from studio.core.quant.grid import fake_quant
    from studio.core.quant.smoothquant import prepare

    handle = run(open_model_job(tiny_dirs[arch]))
    ids, label = text_windows(handle.tokenizer, None, 32, 16, 0)
    before = _snapshot(handle.model)
    plan = Plan(QuantSpec(8, -1, True, "smoothquant"))
    variant = run(quantize_job(handle, plan, ids, label, "sq"))
    assert _same(handle.model, before)
    specs = {n: s for n, s in plan.resolve(handle.layers).items() if s is not None}
    reference = copy.deepcopy(handle.model)
    assert prepare(reference, ids, specs) == variant.act_bits
    for name, spec in specs.items():
        module = reference.get_submodule(name)
        set_weight_matrix(module, fake_quant(weight_matrix(module), spec))
    with torch.no_grad():
        assert torch.equal(variant.model(ids[:2]).logits, reference(ids[:2]).logits)
    embed = handle.model.get_input_embeddings().weight
    assert variant.model.get_input_embeddings().weight is embed      # shared, not copied


def test_awq_carries_only_the_windows_it_reads(tiny_dirs, monkeypatch):
    """AWQ reads the first few windows of each block's inputs: carrying only those through
    the blocks (8 of 16 here) gives the variant that carrying every window gives."""
    from studio.core import quantize as driver
    from studio.core.quant import awq

    handle = run(open_model_job(tiny_dirs["llama"]))
    ids, label = text_windows(handle.tokenizer, None, 32, 16, 0)
    monkeypatch.setattr(awq, "STATS_TOKENS", 96)      # 3 windows of 32 tokens
    monkeypatch.setattr(awq, "SEARCH_TOKENS", 64)
    assert driver.windows_carried({"awq"}, ids) == driver.ERROR_WINDOWS < len(ids)
    plan = Plan(QuantSpec(4, 32, False, "awq"))
    carried = []
    capture = driver.capture_block_inputs

    def counted(model, windows):
        carried.append(len(windows))
        return capture(model, windows)

    monkeypatch.setattr(driver, "capture_block_inputs", counted)
    few = run(quantize_job(handle, plan, ids, label, "few"))
    monkeypatch.setattr(driver, "windows_carried", lambda methods, windows: len(windows))
    every = run(quantize_job(handle, plan, ids, label, "every"))
    assert carried == [driver.ERROR_WINDOWS, len(ids)]
    for name, qt in every.qtensors.items():
        assert torch.equal(few.qtensors[name].codes, qt.codes), name
    assert [e["error"] for e in few.layer_errors] == [e["error"] for e in every.layer_errors]
