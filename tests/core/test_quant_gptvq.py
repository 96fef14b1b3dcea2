import pytest
import torch

from studio.core.errors import StudioError
from studio.core.plan import QuantSpec
from studio.core.quant.gptq import HessianAccumulator, gptq_quantize, relative_output_error
from studio.core.quant.grid import bits_per_weight
from studio.core.quant.gptvq import VQSettings, gptvq_quantize, output_loss


def _hessian(cols=128, tokens=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.3
    x = torch.randn(tokens, cols, generator=gen) @ mix + torch.randn(tokens, cols, generator=gen)
    x[:, :3] *= 8
    acc = HessianAccumulator(cols)
    acc.add(x[None])
    return acc.hessian()


def _clustered(rows=128, cols=128, centres=6, seed=1):
    """Weights whose pairs of adjacent columns come from a few 2-D clusters."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(centres, 2, generator=gen) * 2
    pick = torch.randint(0, centres, (rows * cols // 2,), generator=gen)
    return points[pick].reshape(rows, cols) + 0.05 * torch.randn(rows, cols, generator=gen)


@pytest.mark.parametrize("bits, budget, gptq_group", [(3, 0.125, 128), (2, 0.25, 64)])
def test_beats_gptq_at_no_more_bits_on_planted_structure(bits, budget, gptq_group):
    h = _hessian()
    w = _clustered(rows=256)
    vq, note = gptvq_quantize(w, h, VQSettings(bits, 128, table_bpw=budget, kmeans_iters=10))
    spec = QuantSpec(bits, gptq_group, False, "gptq")
    qt, _ = gptq_quantize(w, h, spec)
    assert note == ""
    assert (vq.storage_bits() / vq.numel()) <= bits + budget <= bits_per_weight(spec, 128) + 1e-9
    assert relative_output_error(w, vq.dequantize(), h) < \
        0.5 * relative_output_error(w, qt.dequantize(), h)


def test_layout_counts_and_indices():
    h = _hessian(cols=96)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    vq, _ = gptvq_quantize(w, h, VQSettings(2, 64, table_bpw=0.5, kmeans_iters=3))
    # columns 0-63 and a ragged 64-95; 16-entry tables of 2-D fp16 vectors
    assert vq.tables.shape[1:] == (2, 16, 2) and vq.columns == 64
    assert vq.indices.shape == (40, 48) and int(vq.indices.max()) < 16
    assert torch.equal(vq.tables, vq.tables.half().float())
    expected = 2 + vq.tables.numel() * 16 / w.numel()
    assert abs((vq.storage_bits() / vq.numel()) - expected) < 1e-9 and (vq.storage_bits() / vq.numel()) <= 2.5
    # de-quantization reads each vector from its own block's table
    rows, columns = vq.rows, vq.columns
    r, j = 39, 47                                   # the last vector: columns 94, 95
    table = vq.tables[r // rows, (2 * j) // columns]
    assert torch.equal(vq.dequantize()[r, 94:96], table[int(vq.indices[r, j])])


def test_table_update_only_ever_lowers_the_output_error():
    h = _hessian(cols=64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    before, _ = gptvq_quantize(w, h, VQSettings(2, 32, table_bpw=0.5, kmeans_iters=5,
                                                update_iters=0))
    after, _ = gptvq_quantize(w, h, VQSettings(2, 32, table_bpw=0.5, kmeans_iters=5))
    assert torch.equal(before.indices, after.indices)
    assert output_loss(w, after.dequantize(), h) < output_loss(w, before.dequantize(), h)


def test_refusals():
    h = _hessian(cols=30)
    w = torch.randn(8, 30)
    with pytest.raises(StudioError, match="multiple of 4"):
        gptvq_quantize(w, h, VQSettings(2, -1, dim=4))
    with pytest.raises(StudioError, match="entries"):
        gptvq_quantize(w, h, VQSettings(8, -1, dim=2))


def test_cli_variant_counts_its_tables_and_reloads_bit_identically(tiny_dirs, tmp_path, capsys):
    import json

    from studio.cli import main
    from studio.core.quant.vector import VectorTensor
    from studio.core.variant import load_variant

    out = tmp_path / "vq"
    assert main(["quantize", str(tiny_dirs["llama"]), "--method", "gptvq", "--bits", "2",
                 "--group-size", "32", "--opt", "table_bpw=0.25", "--opt", "kmeans_iters=5",
                 "--windows", "8", "--seqlen", "64", "--lm-head", "keep", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    variant = load_variant(out)
    tensors = list(variant.qtensors.values())
    assert all(isinstance(q, VectorTensor) and q.dim == 2 for q in tensors)
    stored = sum(q.storage_bits() for q in tensors) / sum(q.numel() for q in tensors)
    assert 2.0 < stored <= 2.25 + 1e-9
    assert result["bits_per_weight"] == pytest.approx(variant.bits_per_weight)
    assert variant.bits_per_weight == pytest.approx(stored)   # tables counted, exactly


def test_a_variant_saves_loads_and_evaluates_bit_identically(tiny_llama, tmp_path):
    from studio.core.jobs import run
    from studio.core.plan import Plan
    from studio.core.quantize import quantize_job
    from studio.core.text import text_windows
    from studio.core.variant import load_variant, save_variant

    windows, label = text_windows(tiny_llama.tokenizer, None, 64, 8, seed=0)
    spec = QuantSpec(3, -1, False, "gptvq", {"kmeans_iters": 5})
    variant = run(quantize_job(tiny_llama, Plan(spec), windows, label, "vq"))
    save_variant(variant, tmp_path / "v")
    again = load_variant(tmp_path / "v", tiny_llama)
    for name, qt in variant.qtensors.items():
        assert torch.equal(qt.dequantize(), again.qtensors[name].dequantize()), name
    with torch.no_grad():
        assert torch.equal(variant.model(input_ids=windows[:2]).logits,
                           again.model(input_ids=windows[:2]).logits)
    assert again.bits_per_weight == variant.bits_per_weight
    assert all(e["error"] < e["rtn_error"] for e in variant.layer_errors)
