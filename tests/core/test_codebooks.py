"""The example codebook plug-in (plugins/studio-codebooks): NF4 and SqueezeLLM-style k-means,
run through the registry as any installed plug-in."""
from pathlib import Path

import pytest
import torch

from studio.core.jobs import run
from studio.core.plan import Plan, QuantSpec
from studio.core.quant import registry
from studio.core.quantize import quantize_job
from studio.core.variant import load_variant, save_variant
from tests.quantizer_plugin import installed_plugin

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "studio-codebooks"
# bitsandbytes' NF4 table (functional.py, `create_normal_map` at offset 0.9677083).
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


@pytest.fixture
def codebooks(tmp_path, monkeypatch):
    """The plug-in's methods in the registry: as installed by `pip install -e` (the test
    setup does), else from the source folder through temporary entry-point metadata."""
    if "nf4" in registry.names():
        yield
        return
    monkeypatch.syspath_prepend(str(PLUGIN))
    with installed_plugin(tmp_path / "site", "studio_codebooks:QUANTIZERS", "studio-codebooks"):
        yield


def test_nf4_levels_are_bitsandbytes_nf4(codebooks):
    from studio_codebooks.nf4 import normal_float_levels

    torch.testing.assert_close(normal_float_levels(4), torch.tensor(BNB_NF4), rtol=0, atol=1e-6)
    assert len(normal_float_levels(3)) == 8 and normal_float_levels(3)[3] == 0


def test_nf4_rounds_each_weight_to_the_nearest_scaled_level(codebooks):
    from studio_codebooks.nf4 import quantize_nf

    torch.manual_seed(0)
    w = torch.randn(8, 100)   # 100 = one group of 64 and a ragged one of 36
    qt = quantize_nf(w, QuantSpec(4, 64, method="nf4"))
    assert qt.scale.shape == (8, 2) and qt.constant_table
    scale = qt.scale.repeat_interleave(64, dim=1)[:, :100]
    candidates = torch.tensor(BNB_NF4).half().float()[None, None, :] * scale[..., None]
    best = (w[..., None] - candidates).abs().min(dim=2).values
    torch.testing.assert_close((w - qt.dequantize()).abs(), best, rtol=0, atol=1e-6)
    assert qt.storage_bits() == 4 * 800 + 16 * 16    # indices + one fp16 absmax per group


def test_weighted_kmeans_finds_the_weighted_means(codebooks):
    from studio_codebooks.kmeans import nearest, weighted_kmeans

    torch.manual_seed(0)
    # Four planted clusters; the weights make two points of the first cluster dominate.
    x = torch.cat([c + 0.01 * torch.randn(50) for c in (-2.0, -0.5, 0.7, 3.0)])[None]
    weight = torch.ones_like(x)
    weight[0, :2] = 1000.0
    centroids, steps = weighted_kmeans(x, weight, 4, 100)
    assert steps < 100
    assign = nearest(x, centroids)
    for k in range(4):
        mine = assign[0] == k
        expected = (x[0, mine] * weight[0, mine]).sum() / weight[0, mine].sum()
        torch.testing.assert_close(centroids[0, k], expected)
    # A row with no more distinct values than levels is stored exactly.
    few = torch.tensor([[0.5, -1.0, 0.5, 2.0, -1.0, 0.25]])
    c, _ = weighted_kmeans(few, torch.ones_like(few), 4, 50)
    assert torch.equal(c.gather(1, nearest(few, c)), few)


@pytest.mark.parametrize("feedback", [True, False])
def test_kmeans_beats_rtn_on_every_layer_and_counts_its_tables(codebooks, tiny_llama, feedback):
    """Each layer's output error on the calibration inputs (the driver's record) is below
    plain RTN's on the same per-channel grid, with error feedback and without."""
    from studio.core.text import text_windows

    windows, label = text_windows(tiny_llama.tokenizer, None, 64, 8, seed=0)
    spec = QuantSpec(3, -1, method="kmeans", options={"feedback": feedback})
    variant = run(quantize_job(tiny_llama, Plan(spec), windows, label, "kmeans"))
    assert len(variant.layer_errors) == len(tiny_llama.quantizable)
    for entry in variant.layer_errors:
        assert entry["error"] < entry["rtn_error"], entry
    stored = sum(q.storage_bits() for q in variant.qtensors.values())
    counted = sum(variant.specs[n].quantizer.storage_bits(variant.specs[n], q.shape[1])
                  * q.numel() for n, q in variant.qtensors.items())
    assert stored == pytest.approx(counted)


def test_nf4_and_kmeans_variants_save_load_and_evaluate_bit_identically(codebooks, tiny_llama,
                                                                        tmp_path):
    from studio.core.evaluate import evaluate_job
    from studio.core.plan import Rule
    from studio.core.text import text_windows

    windows, label = text_windows(tiny_llama.tokenizer, None, 64, 8, seed=0)
    plan = Plan(QuantSpec(4, 32, method="nf4"),
                rules=(Rule(r".*mlp\..*", QuantSpec(4, 64, method="kmeans",
                                                   options={"iterations": 20, "rows": 2}),
                            True),))
    variant = run(quantize_job(tiny_llama, plan, windows, label, "codebooks"))
    assert {s.method for s in variant.specs.values()} == {"nf4", "kmeans"}
    save_variant(variant, tmp_path / "v")
    again = load_variant(tmp_path / "v", tiny_llama)
    for name, qt in variant.qtensors.items():
        assert torch.equal(qt.dequantize(), again.qtensors[name].dequantize()), name
    first = run(evaluate_job(variant.model, tiny_llama.model, tiny_llama.tokenizer, seqlen=64,
                             windows=4))
    second = run(evaluate_job(again.model, tiny_llama.model, tiny_llama.tokenizer, seqlen=64,
                              windows=4))
    assert first.ppl == second.ppl and first.kl == second.kl
    assert again.bits_per_weight == variant.bits_per_weight


def test_plan_with_a_codebook_method_uses_only_its_widths(codebooks, tiny_dirs, tmp_path, capsys):
    import json

    from studio.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_dirs["llama"]), "--budget-bpw", "3.9", "--method", "nf4",
                 "--proxy-only", "--bits", "2,4,5", "--group-sizes", "32", "--windows", "2",
                 "--seqlen", "32", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    plan = Plan.load(out)
    # The body's layers; the ends keep the plan's setting (--lm-head w8 by default, RTN).
    specs = [r.spec for r in plan.rules if r.spec is not None
             and r.pattern not in ("lm_head", "model.embed_tokens")]
    assert specs and all(s.method == "nf4" and s.bits in (2, 3, 4) for s in specs)
    assert any(r.pattern == "lm_head" for r in plan.rules)
    assert result["bits_per_weight"] <= 3.9


def test_error_feedback_lowers_the_output_error_on_correlated_inputs(codebooks):
    """Inputs that move together (as a model's do) are what GPTQ's feedback exploits: the
    rounding error of one column is largely undone by the next ones."""
    from studio.core.quant.gptq import HessianAccumulator, relative_output_error
    from studio.core.quant.registry import LayerCalibration
    from studio_codebooks.kmeans import quantize_kmeans

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4096, 16, generator=gen) @ torch.randn(16, 96, generator=gen) \
        + 0.1 * torch.randn(4096, 96, generator=gen)
    acc = HessianAccumulator(96)
    acc.add(x[None])
    h = acc.hessian()
    w = torch.randn(48, 96, generator=gen)
    errors = {}
    for feedback in (False, True):
        spec = QuantSpec(3, -1, method="kmeans", options={"feedback": feedback})
        qt, _ = quantize_kmeans(w, spec, LayerCalibration(h, 4096))
        assert qt.table.shape == (48, 1, 8)
        errors[feedback] = relative_output_error(w, qt.dequantize(), h)
    assert errors[True] < 0.5 * errors[False]


def test_feedback_needs_the_hessian_weighting(codebooks):
    from studio.core.errors import StudioError
    from studio.core.quant.registry import LayerCalibration
    from studio_codebooks.kmeans import quantize_kmeans

    spec = QuantSpec(4, -1, method="kmeans", options={"weighting": "none"})
    with pytest.raises(StudioError, match="feedback=false"):
        quantize_kmeans(torch.randn(4, 32), spec, LayerCalibration(torch.eye(32), 10))


@pytest.mark.parametrize("feedback", [True, False])
def test_kmeans_rows_share_a_table_counted_once(codebooks, feedback):
    """`rows=2`: two consecutive rows draw their levels from one table, so a layer stores half
    the tables (a ragged last row alone keeps a whole one), counted as stored; the codes save
    and load exactly."""
    from studio.core.quant.codebook import CodebookTensor
    from studio.core.quant.gptq import HessianAccumulator, relative_output_error
    from studio.core.quant.registry import LayerCalibration
    from studio_codebooks.kmeans import quantize_kmeans

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2048, 16, generator=gen) @ torch.randn(16, 96, generator=gen) \
        + 0.1 * torch.randn(2048, 96, generator=gen)
    acc = HessianAccumulator(96)
    acc.add(x[None])
    calib = LayerCalibration(acc.hessian(), 2048)
    w = torch.randn(47, 96, generator=gen)
    shared = QuantSpec(3, -1, method="kmeans", options={"feedback": feedback, "rows": 2})
    qt, _ = quantize_kmeans(w, shared, calib)
    assert qt.table.shape == (24, 1, 8) and qt.rows == 2
    assert qt.storage_bits() == 3 * 47 * 96 + 16 * 24 * 8
    deq = qt.dequantize()
    for r in range(47):
        assert set(deq[r].tolist()) <= set(qt.table[r // 2, 0].tolist())
    tensors, info = qt.to_state()
    again = CodebookTensor.from_state(tensors, info, (47, 96))
    assert torch.equal(again.dequantize(), deq) and again.rows == 2
    # the price the plan meter sees: half a table per row
    assert shared.quantizer.storage_bits(shared, 96) == 3 + 16 * 8 / (96 * 2)
    own, _ = quantize_kmeans(w, QuantSpec(3, -1, method="kmeans",
                                          options={"feedback": feedback}), calib)
    # a shared table fits two rows' weights, not one: some error is the price of the bits
    assert relative_output_error(w, deq, calib.hessian) \
        >= relative_output_error(w, own.dequantize(), calib.hessian)


def test_a_codebook_table_block_must_match_its_rows():
    from studio.core.errors import StudioError
    from studio.core.quant.codebook import CodebookTensor

    indices = torch.zeros(5, 8, dtype=torch.uint8)
    with pytest.raises(StudioError, match="2 row"):
        CodebookTensor(indices, torch.zeros(5, 1, 4), None, 2, -1, rows=2)
    with pytest.raises(StudioError, match="whole number of rows"):
        CodebookTensor(indices, torch.zeros(3, 1, 4), None, 2, -1, rows=0)
    assert CodebookTensor(indices, torch.zeros(3, 1, 4), None, 2, -1, rows=2).rows == 2
