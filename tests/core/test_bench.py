"""Benchmarks: figures for every target, kernels named, nothing partial when cancelled."""
import pytest
import torch

from studio.core.bench import base_targets, bench_job, variant_target
from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, run
from studio.core.plan import QuantSpec
from studio.core.q4_native import unavailable
from studio.core.quant.grid import quantize_rtn

INT4 = "int4pack" if unavailable() else "q4native"   # the low-bit kernels that run here
INT8 = "int8pack" if unavailable() else "q8native"


def targets_for(handle, configs=("fp32", "int4")):
    return base_targets(handle.model, configs, group_size=32,
                        layer_names=[i.name for i in handle.quantizable])


def test_bench_measures_each_target(tiny_llama):
    threads = torch.get_num_threads()
    results = run(bench_job(targets_for(tiny_llama, ("fp32", "bf16", "int8", "int4")), 384,
                            prompt_tokens=8, new_tokens=4, repeat=2, threads=1))
    assert [r.name for r in results] == ["fp32", "bf16", "int8 + lm_head", "int4 g32 + lm_head"]
    for r in results:
        assert r.prefill_ms > 0 and r.decode_tok_s > 0 and r.peak_rss_mb > 0
        assert r.prefill_ms_range[0] <= r.prefill_ms <= r.prefill_ms_range[1]
        assert r.threads == 1 and r.repeat == 2
        data = r.to_dict()
        assert data["kernel_summary"] and data["new_tokens"] == 4
    fp32, bf16, int8, int4 = results
    assert set(fp32.to_dict()["kernel_summary"]) == {"fp32 dense"}
    assert set(int4.to_dict()["kernel_summary"]) == {f"{INT4} g32"}
    assert {k.split(" g")[0] for k in int8.to_dict()["kernel_summary"]} == {INT8}
    # Fewer bytes per token as the weights shrink.
    assert fp32.weights_read_mb > bf16.weights_read_mb > int8.weights_read_mb > int4.weights_read_mb
    assert torch.get_num_threads() == threads  # restored


def test_variant_with_misfit_layers_reports_fallbacks(tiny_llama):
    model = tiny_llama.model
    spec = QuantSpec(bits=6, group_size=32)  # no kernel takes 6 bits in groups
    qtensors = {i.name: quantize_rtn(model.get_submodule(i.name).weight.data, spec)
                for i in tiny_llama.quantizable}
    [result] = run(bench_job([variant_target("w6", model, qtensors, kernels="torch")],
                             384, 4, 2, 1))
    assert len(result.fallbacks) == len(qtensors)
    assert all("one scale per output channel" in k.note for k in result.fallbacks)
    if not unavailable():   # the studio's kernels take 6-bit codes in groups of 32
        [native] = run(bench_job([variant_target("w6", model, qtensors)], 384, 4, 2, 1))
        assert not native.fallbacks   # (the float lm_head stays an fp32 dense layer)
        assert native.to_dict()["kernel_summary"]["q8native g32"] == len(qtensors)


def test_cancelled_bench_reports_nothing(tiny_llama):
    token = CancelToken()
    seen = []

    def on_progress(p):
        seen.append(p.message)
        if "run 1" in p.message:
            token.cancel()
    threads = torch.get_num_threads()
    with pytest.raises(Cancelled):
        run(bench_job(targets_for(tiny_llama), 384, 8, 4, 2, threads=1), on_progress, token)
    assert any("run 1" in m for m in seen)
    assert torch.get_num_threads() == threads


def test_bad_settings_are_clear_errors(tiny_llama):
    with pytest.raises(StudioError, match="Unknown benchmark configuration"):
        base_targets(tiny_llama.model, ("fp16",))
    with pytest.raises(StudioError, match="at least 1"):
        run(bench_job(targets_for(tiny_llama), 384, prompt_tokens=0))


def test_cli_bench_model_and_variant(tiny_dirs, tiny_llama, tmp_path, capsys):
    import json

    from studio.cli import main
    from studio.core.plan import Plan
    from studio.core.quantize import quantize_job
    from studio.core.variant import save_variant

    folder = str(tiny_dirs["llama"])
    args = ["--prompt-tokens", "8", "--new-tokens", "3", "--repeat", "1", "--threads", "1"]
    assert main(["bench", folder, *args, "--configs", "fp32,int4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "fp32" and data["decode_tok_s"] > 0 and data["prefill_ms"] > 0
    assert [r["name"] for r in data["runs"]] == ["fp32", "int4 g32 + lm_head"]
    assert {"peak_rss_mb", "size_mb", "kernels", "threads"} <= set(data)

    variant = run(quantize_job(tiny_llama, Plan(default=QuantSpec(bits=4, group_size=64)),
                               None, None, "w4g64"))
    save_variant(variant, tmp_path / "w4g64")
    assert main(["bench", str(tmp_path / "w4g64"), *args]) == 0
    out = capsys.readouterr().out
    assert "w4g64" in out and INT4 in out


@pytest.mark.parametrize("arch, prompt_length", [
    ("llama", 12), ("qwen2", 12), ("gemma", 12), ("qwen3", 12),
    ("mistral", 12),    # window 16: the decode steps pass it
    ("mistral", 20),    # a prompt longer than the window: the prefill's mask
    ("gemma2", 12),     # soft-capping, four norms a block, sliding layers past their window
    ("gemma2", 20),
    ("gemma3", 12),     # q/k norms, local and global rotary bases
    ("gemma3", 20),
    ("phi3", 12),       # qkv_proj and gate_up_proj
])
def test_lean_decoder_gives_the_models_own_logits(family_dirs, arch, prompt_length):
    from studio.core.lean_decoder import LeanDecoder, lean_supported
    from studio.core.models import open_model_job

    handle = run(open_model_job(family_dirs[arch]))
    if arch == "gemma2":   # caps a tiny random model's small scores and logits actually reach
        for layer in handle.model.model.layers:
            layer.self_attn.attn_logit_softcapping = 0.01
        handle.model.config.final_logit_softcapping = 0.5
    int4 = base_targets(handle.model, ("int4",), layer_names=[i.name for i in handle.quantizable])
    for model in (handle.model, int4[0].build()[0]):
        assert lean_supported(model)
        prompt = torch.randint(3, 384, (1, prompt_length),
                               generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            decoder = LeanDecoder(model, prompt_length + 8)
            lean = [decoder.forward(prompt, 0)]
            out = model(input_ids=prompt, use_cache=True)
            ref = [out.logits[:, -1]]
            for position in range(prompt_length, prompt_length + 6):
                token = ref[-1].argmax(-1, keepdim=True)
                lean.append(decoder.forward(token, position))
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                ref.append(out.logits[:, -1])
        for a, b in zip(lean, ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures_run_on_kernels_through_transformers(tiny_dirs, arch):
    from studio.core.lean_decoder import lean_supported
    from studio.core.models import open_model_job

    handle = run(open_model_job(tiny_dirs[arch]))
    assert not lean_supported(handle.model)
    targets = base_targets(handle.model, ("fp32", "int4"),
                           layer_names=[i.name for i in handle.quantizable])
    fp32, int4 = run(bench_job(targets, 384, prompt_tokens=6, new_tokens=3, repeat=1, threads=1))
    assert int4.decode_tok_s > 0 and int4.to_dict()["decode_loop"] == "transformers"
    assert int4.to_dict()["decode_step"] == (f"transformers' forward (the lean decoder does not "
                                             f"follow {arch} blocks)")
    assert f"{INT4} g32" in int4.to_dict()["kernel_summary"]
    # The kernel model computes what the de-quantized float model computes (GPT-2's Conv1D
    # weights are stored transposed: a mix-up would show here).
    import copy

    from torch import nn

    from studio.core.layers import set_weight_matrix, weight_matrix
    model, _ = targets[1].build()
    reference = copy.deepcopy(handle.model)
    reference.lm_head.weight = nn.Parameter(reference.lm_head.weight.clone(), requires_grad=False)
    for name in [i.name for i in handle.quantizable] + ["lm_head"]:
        module = reference.get_submodule(name)
        set_weight_matrix(module, quantize_rtn(weight_matrix(module),
                                               QuantSpec(bits=4, group_size=32)).dequantize())
    ids = torch.randint(3, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits.float()
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


def test_bench_size_is_the_size_quantize_compare_and_export_give(tiny_dirs, tmp_path, capsys):
    """One size: bench's model_mb / size_mb are the variant's size_breakdown (not its runtime
    tensors), and the on-the-fly int8 / int4 models are counted the same way as a variant
    of their plan."""
    import json

    from studio.cli import main
    from studio.core.models import open_model_job
    from studio.core.plan import Plan, Rule
    from studio.core.quantize import quantize_job
    from studio.core.runs import describe_variant
    from studio.core.variant import load_variant

    folder, out = str(tiny_dirs["llama"]), tmp_path / "v"
    assert main(["quantize", folder, "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--lm-head", "w8", "--out", str(out), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    args = ["--prompt-tokens", "4", "--new-tokens", "2", "--repeat", "1", "--threads", "1"]
    assert main(["bench", str(out), *args, "--json"]) == 0
    benched = json.loads(capsys.readouterr().out)
    assert benched["size_breakdown"] == made["size_breakdown"]
    assert benched["size_source"] == "stored"
    assert benched["model_mb"] == benched["size_mb"] == round(made["size_bytes"] / 2**20, 2)
    assert benched["runtime_mb"] > benched["model_mb"]      # fp32 floats as they run
    handle = run(open_model_job(folder))
    variant = load_variant(out, handle)
    assert describe_variant(variant)["size_mb"] == made["size_bytes"] / 2**20   # Compare

    # The on-the-fly int4 (+ lm_head) model weighs what an RTN variant of its plan weighs.
    spec = QuantSpec(bits=4, group_size=32)
    [int4] = base_targets(handle.model, ("int4",), group_size=32,
                          layer_names=[i.name for i in handle.quantizable])
    plan = Plan(spec).with_rule(Rule("lm_head", spec))
    same = run(quantize_job(handle, plan, None, None, "int4 + head"))
    assert int4.size_breakdown == same.size_breakdown and same.shared   # the tied matrix once
    [fp32] = base_targets(handle.model, ("fp32",))
    from studio.core.runs import describe_baseline
    assert sum(fp32.size_breakdown.values()) / 2**20 == describe_baseline(handle)["size_mb"]


def test_the_benchmark_collects_only_what_it_made(tiny_llama, monkeypatch):
    """A full gc.collect() walks every object of the process with the GIL held (0.8 s with the
    demo open, the window waiting): the objects alive before the benchmark are frozen out of
    its collections, and given back to the collector after it, run to the end or cancelled."""
    import gc

    from studio.core import garbage
    from studio.core.bench import base_targets, bench_job

    monkeypatch.setattr(garbage, "_collect", None)   # headless, even after the Qt tests
    frozen = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: (frozen.append(gc.get_freeze_count()),
                                                   real(*a))[1])
    targets = base_targets(tiny_llama.model, ("fp32",))
    run(bench_job(targets, tiny_llama.model.config.vocab_size, prompt_tokens=4, new_tokens=2,
                  repeat=1))
    assert frozen and all(count > 1000 for count in frozen)
    assert gc.get_freeze_count() == 0
    job = bench_job(targets, tiny_llama.model.config.vocab_size, prompt_tokens=4, new_tokens=2,
                    repeat=1)
    next(job)
    job.close()                                     # a cancel
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_the_lean_families_beyond_llama_bench_on_the_native_step(family_dirs, arch):
    """Gemma 2/3 (per-layer windows, soft-caps, four norms a block, per-type rotations) and
    Phi-3 (fused qkv_proj / gate_up_proj) decode through the native step in the benchmark."""
    from studio.core import q4_native
    from studio.core.models import open_model_job

    if q4_native.unavailable():   # the reason is given where the layers are native
        pytest.skip(q4_native.unavailable())

    handle = run(open_model_job(family_dirs[arch]))
    [int4] = base_targets(handle.model, ("int4",),
                          layer_names=[i.name for i in handle.quantizable])
    [result] = run(bench_job([int4], 384, prompt_tokens=6, new_tokens=3, repeat=1, threads=1))
    report = result.to_dict()
    assert result.decode_tok_s > 0 and report["decode_loop"].startswith("lean")
    assert report["decode_step"].startswith("native"), report["decode_step"]
