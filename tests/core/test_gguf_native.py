"""fp16 scales and GGUF-native plans: every method computes its codes against fp16-valued
scales, recipes carry the setting, and GGUF-native specs are priced at their GGUF type's bytes
by the allocator, the plan meter and the variant alike."""
import json

import numpy as np
import pytest
import torch

from studio.core.allocate import LossTable, allocate, loss_table, plan_size, spec_bits, table_for
from studio.core.errors import StudioError
from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.plan_export import ggml_type
from studio.core.quant.grid import (bits_per_weight, quantize_codes, quantize_rtn,
                                    storage_bits_per_weight)
from studio.core.quant.rtn import quantize_weight
from studio.core.quantize import quantize_job
from studio.core.sensitivity import (SensitivityResult, gguf_native_options, option_label,
                                     sensitivity_job)
from studio.core.text import text_windows

Q4_0, Q5_0, Q8_0 = gguf_native_options()


def fp16_valued(t: torch.Tensor) -> bool:
    return torch.equal(t, t.half().float())


def weights(rows=48, cols=160, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[:, 7] *= 6  # an outlier column, so groups differ in range
    return w


# --- the spec ---------------------------------------------------------------------------------

def test_scale_dtype_is_validated_labelled_and_round_trips(tmp_path):
    with pytest.raises(StudioError, match="fp32 or fp16"):
        QuantSpec(scale_dtype="bf16")
    spec = QuantSpec(4, 32, True, "gptq", scale_dtype="fp16")
    assert spec.label == "GPTQ W4 g32 sym f16s" and QuantSpec(4, 32, True).label == "RTN W4 g32 sym"
    assert option_label(spec) == "Q4_0" and option_label(spec.with_(group_size=64)) == \
        "W4 g64 sym f16s"
    plan = Plan(default=QuantSpec(), rules=(Rule(r".*down_proj", spec, regex=True),))
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    # fp32 specs are written as before the field existed, so older recipes and studios agree.
    data = json.loads((tmp_path / "plan.json").read_text())
    assert "scale_dtype" not in data["default"]
    assert data["rules"][0]["spec"]["scale_dtype"] == "fp16"
    old = {"bits": 4, "group_size": 128, "symmetric": False, "method": "rtn", "options": {}}
    assert QuantSpec.from_dict(old).scale_dtype == "fp32"


# --- every method's scales ------------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 64, False),
                                  QuantSpec(8, -1, True), QuantSpec(5, 128, False)])
@pytest.mark.parametrize("mse_clip", [False, True])
def test_rtn_codes_are_computed_against_fp16_scales(spec, mse_clip):
    w = weights()
    spec = spec.with_(options={"mse_clip": mse_clip}, scale_dtype="fp16")
    qt = quantize_weight(w, spec)
    assert fp16_valued(qt.scale) and fp16_valued(qt.zero)
    # The codes are RTN's against the stored (rounded) scale, not rounded after the fact.
    assert torch.equal(qt.codes, quantize_codes(w, qt.scale, qt.zero, spec.bits, qt.group_size))
    fp32 = quantize_weight(w, spec.with_(scale_dtype="fp32"))
    assert not fp16_valued(fp32.scale)
    err16 = (qt.dequantize() - w).pow(2).sum().item()
    err32 = (fp32.dequantize() - w).pow(2).sum().item()
    assert err16 == pytest.approx(err32, rel=0.01)


@pytest.mark.parametrize("scale", [1e-12, 1e-7, 1e7])
def test_fp16_scales_out_of_range_give_finite_codes(scale):
    w = weights() * scale
    for symmetric in (True, False):
        qt = quantize_rtn(w, QuantSpec(4, 32, symmetric, scale_dtype="fp16"))
        assert torch.all(qt.scale > 0) and torch.all(torch.isfinite(qt.scale))
        assert torch.all((qt.zero >= 0) & (qt.zero <= 15))
        assert torch.all(torch.isfinite(qt.dequantize()))


@pytest.mark.parametrize("act_order", [False, True])  # dynamic groups; groups fixed up front
def test_gptq_scales_are_fp16_and_its_error_is_fp32s(act_order):
    from studio.core.quant.gptq import HessianAccumulator, gptq_quantize, relative_output_error

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 96, generator=gen) @ torch.randn(96, 96, generator=gen)
    acc = HessianAccumulator(96)
    acc.add(x)
    h, w = acc.hessian(), weights(cols=96)
    spec = QuantSpec(4, 32, True, "gptq", {"act_order": act_order}, scale_dtype="fp16")
    qt, _ = gptq_quantize(w, h, spec)
    assert fp16_valued(qt.scale)
    fp32, _ = gptq_quantize(w, h, spec.with_(scale_dtype="fp32"))
    assert not fp16_valued(fp32.scale)
    err16 = relative_output_error(w, qt.dequantize(), h)
    err32 = relative_output_error(w, fp32.dequantize(), h)
    assert err16 == pytest.approx(err32, rel=0.05)


def test_awq_search_quantizes_on_the_fp16_grid():
    from studio.core.quant.awq import fake_quant_matrix

    w = weights(cols=200)  # ragged last group
    spec = QuantSpec(4, 32, True, "awq", scale_dtype="fp16")
    torch.testing.assert_close(fake_quant_matrix(w, spec), quantize_rtn(w, spec).dequantize(),
                               rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def calib(tiny_llama):
    return text_windows(tiny_llama.tokenizer, None, 64, 8, 0)


@pytest.mark.parametrize("spec", [
    QuantSpec(4, 64, False, "rtn", scale_dtype="fp16"),
    QuantSpec(4, 32, True, "gptq", scale_dtype="fp16"),
    QuantSpec(5, 32, True, "awq", {"grid": 5}, scale_dtype="fp16"),
    QuantSpec(8, -1, True, "smoothquant", scale_dtype="fp16"),
])
def test_every_method_gives_fp16_scales_with_fp32s_error(tiny_llama, calib, spec):
    ids, label = calib
    variant = run(quantize_job(tiny_llama, Plan(spec), ids, label, "f16s"))
    assert variant.qtensors and all(fp16_valued(qt.scale) for qt in variant.qtensors.values())
    assert all(s.scale_dtype == "fp16" for s in variant.specs.values())
    reference = run(quantize_job(tiny_llama, Plan(spec.with_(scale_dtype="fp32")), ids, label,
                                 "f32s"))
    assert not all(fp16_valued(qt.scale) for qt in reference.qtensors.values())
    mean = lambda v: np.mean([e["error"] for e in v.layer_errors])  # noqa: E731
    assert mean(variant) == pytest.approx(mean(reference), rel=0.05)
    if spec.method == "rtn":  # the RTN error beside each layer is RTN's on the same fp16 grid
        assert all(e["error"] == e["rtn_error"] for e in variant.layer_errors)


# --- pricing --------------------------------------------------------------------------------

def test_gguf_native_specs_cost_their_gguf_bytes_and_others_are_unchanged():
    assert [storage_bits_per_weight(s, 4096) for s in (Q4_0, Q5_0, Q8_0)] == [4.5, 5.5, 8.5]
    # Not native: the studio's own count, whatever the scale type.
    for spec in (QuantSpec(4, 128), QuantSpec(4, 32, True), QuantSpec(3, 32, True,
                                                                       scale_dtype="fp16"),
                 QuantSpec(4, 64, True, scale_dtype="fp16"), None):
        assert storage_bits_per_weight(spec, 576) == bits_per_weight(spec, 576)
    # Rows that are not whole GGUF blocks are no GGUF tensor: the estimate (ragged group).
    assert storage_bits_per_weight(Q4_0, 48) == bits_per_weight(Q4_0, 48) == 4 + 2 * 16 / 48
    assert spec_bits((10, 64), Q5_0) == 10 * 64 * 5.5
    assert [ggml_type(s) for s in (Q4_0, Q5_0, Q8_0, QuantSpec(4, 32, True), None)] == \
        ["q4_0", "q5_0", "q8_0", "q4_K", "f16"]


def test_a_gguf_native_variant_reports_gguf_bits(tiny_llama):
    plan = Plan(Q4_0, rules=(Rule(r".*down_proj", Q8_0, regex=True),))
    variant = run(quantize_job(tiny_llama, plan, None, None, "native"))
    down = [n for n in variant.qtensors if n.endswith("down_proj")]
    other = {n: qt.numel() for n, qt in variant.qtensors.items() if n not in down}
    down_numel = sum(variant.qtensors[n].numel() for n in down)
    expected = (4.5 * sum(other.values()) + 8.5 * down_numel) / (sum(other.values()) + down_numel)
    assert variant.bits_per_weight == pytest.approx(expected)
    size = plan_size(tiny_llama, plan)
    assert size.size_bytes == variant.size_bytes
    assert size.bits_per_weight == pytest.approx(variant.bits_per_weight)


# --- the GGUF-native menu in the allocator -----------------------------------------------------

def native_table(shapes) -> LossTable:
    options = [Q4_0, Q5_0, Q8_0, None]
    rng = np.random.default_rng(0)
    loss = np.array([[s * 4.0 ** -b for b in (4, 5, 8)] + [0.0]
                     for s in rng.lognormal(0, 1, len(shapes))])
    allowed = [[(o is None or cols % 32 == 0) for o in options] for _, cols in shapes]
    return LossTable([f"l{i}" for i in range(len(shapes))], shapes, options, loss,
                     allowed=allowed)


def test_a_budget_above_q4_0_buys_q5_0_and_ragged_rows_stay_fp16():
    shapes = [(64, 64)] * 20 + [(64, 48)]   # smallest plan: 4.92 bits/weight (the last at fp16)
    table = native_table(shapes)
    answer = allocate(table, budget_bpw=5.2)
    picked = [answer.choices[f"l{i}"] for i in range(len(shapes))]
    assert picked[-1] is None                        # 48-wide rows: only fp16
    assert Q5_0 in picked and answer.bits <= answer.budget_bits
    assert answer.bits == sum(spec_bits(s, o) for s, o in zip(shapes, picked))
    # The priced bits are the GGUF types' real bytes: 18 / 22 / 34 bytes per 32 weights.
    block_bytes = {4: 18, 5: 22, 8: 34}
    assert answer.bits == sum(8 * block_bytes[o.bits] * r * c // 32 if o else 16 * r * c
                              for (r, c), o in zip(shapes, picked))
    with pytest.raises(StudioError, match="can take none"):
        LossTable(["x"], [(8, 48)], [Q4_0], [[1.0]], allowed=[[False]])


def test_gguf_native_plan_from_a_native_sweep(tiny_llama, calib):
    ids, _ = calib
    result = run(sensitivity_job(tiny_llama, ids, gguf_native=True, kl_windows=0,
                                 proxy_windows=2))
    assert result.labels == ["Q4_0", "Q5_0", "Q8_0"]
    reloaded = SensitivityResult.from_json(json.loads(json.dumps(result.to_json())))
    assert reloaded.options == result.options
    table = loss_table(result, tiny_llama, kind="proxy", method="gptq", gguf_native=True)
    answer = allocate(table, budget_bpw=5.0)
    menu = [o.with_(method="gptq") for o in (Q4_0, Q5_0, Q8_0)] + [None]
    specs = list(answer.choices.values())
    assert all(spec in menu for spec in specs) and menu[1] in specs
    assert plan_size(tiny_llama, answer.plan).bits_per_weight <= 5.0
    # A sweep of other grids has no GGUF-native options to choose from.
    plain = run(sensitivity_job(tiny_llama, ids, bits=(4, 5, 8), group_sizes=(32,),
                                symmetric=True, kl_windows=0, proxy_windows=2))
    with pytest.raises(StudioError, match="did not measure the GGUF-native options"):
        loss_table(plain, tiny_llama, kind="proxy", gguf_native=True)


def test_layers_with_ragged_rows_can_only_stay_fp16(tmp_path):
    import transformers as tf

    from studio.core.models import open_model_job
    from tests.tiny_models import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 80            # down_proj's rows: 80 weights, not 32-weight blocks
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    handle = run(open_model_job(tmp_path))
    loss = np.tile([2.0, 1.0, 0.0], (len(handle.quantizable), 1))
    table = table_for(handle, [Q4_0, Q5_0, None], loss)
    answer = allocate(table, budget_bpw=7.0)   # fp16 down_proj alone takes it to 6.63
    for name, spec in answer.choices.items():
        assert (spec is None) if name.endswith("down_proj") else (spec is not None), name
    with pytest.raises(StudioError, match="not whole 32-weight GGUF blocks"):
        table_for(handle, [Q4_0, Q5_0])
