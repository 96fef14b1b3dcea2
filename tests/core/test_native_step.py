"""The native decode step (decode_step.c: every block of a token in one C call) computes what
the eager lean step computes on the same int4 layers.

Tolerance: each step's logits within 1e-2 relative (norm) of the eager step's, and the same
greedy token. Both quantize each product's input to int8 per 32 values; the C norms and
attention round float sums in another order, so now and then a value rounds to the other int8
code, and that difference grows through the blocks (on the demo's 30 blocks: ~1% of the
logits, the same distance as either path's from the float model; on these 2-block models
it stays near 1e-3).
"""
import pytest
import torch

from studio.core import q4_native
from studio.core.bench import LeanRun, base_targets, bench_job
from studio.core.kernels import kernel_model
from studio.core.plan import QuantSpec
from studio.core.quant.grid import quantize_rtn
from studio.core.jobs import run
from studio.core.lean_decoder import LeanDecoder
from studio.core.native_step import NativeStep

pytestmark = pytest.mark.skipif(bool(q4_native.unavailable()),
                                reason=f"native kernel: {q4_native.unavailable()}")


def model_of(tiny_dirs, arch, config="int4"):
    from studio.core.models import open_model_job

    handle = run(open_model_job(tiny_dirs[arch]))
    names = [i.name for i in handle.quantizable]
    return handle, base_targets(handle.model, (config,), layer_names=names)[0].build()[0]


def greedy(step, decoder, prompt, count=8):
    """Logits of the prompt's last token and `count` greedy steps after it (fed the eager
    path's tokens, so both sides see the same inputs)."""
    logits = [decoder.forward(prompt, 0)]
    position = prompt.shape[1]
    for _ in range(count):
        logits.append(step(logits[-1].argmax(-1, keepdim=True), position))
        position += 1
    return logits


@pytest.mark.parametrize("arch, config", [("llama", "int4"), ("qwen2", "int4"),
                                          ("llama", "int8"), ("mistral", "int4")])
def test_native_step_equals_the_eager_step(family_dirs, arch, config):
    _, model = model_of(family_dirs, arch, config)
    length = 12     # + 8 steps: past Mistral's window of 16
    prompt = torch.randint(3, 384, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager_decoder = LeanDecoder(model, length + 9, fused=True)
        eager = greedy(eager_decoder.forward, eager_decoder, prompt)
        decoder = LeanDecoder(model, length + 9, fused=True)
        assert NativeStep.problem(decoder) is None
        native = greedy(NativeStep(decoder), decoder, prompt)
    for i, (a, b) in enumerate(zip(native, eager)):
        assert ((a - b).norm() / b.norm()).item() < 1e-2, i
        assert a.argmax() == b.argmax(), i


def test_threads_share_out_the_step_without_changing_it(family_dirs):
    """One thread team per token: rows and heads are shared out, each computed whole by one
    thread, so the logits are the same bits at one thread and at three (more than the cores,
    so threads interleave)."""
    _, model = model_of(family_dirs, "llama")
    prompt = torch.randint(3, 384, (1, 10), generator=torch.Generator().manual_seed(1))
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            with torch.inference_mode():
                decoder = LeanDecoder(model, 20, fused=True)
                runs.append(greedy(NativeStep(decoder), decoder, prompt, count=6))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*runs):
        assert torch.equal(one, three)


def test_the_benchmark_decodes_through_it_and_says_so(tiny_dirs):
    handle, _ = model_of(tiny_dirs, "llama")
    names = [i.name for i in handle.quantizable]
    targets = base_targets(handle.model, ("fp32", "int4"), layer_names=names)
    fp32, int4 = run(bench_job(targets, 384, prompt_tokens=6, new_tokens=4, repeat=1, threads=1))
    assert int4.details["decode_step"] == NativeStep.mode and int4.decode_tok_s > 0
    assert fp32.details["decode_step"] == NativeStep.mode    # float32 weights read natively
    (bf16,) = run(bench_job(base_targets(handle.model, ("bf16",), layer_names=names), 384,
                            6, 4, 1, threads=1))
    assert bf16.details["decode_step"] == NativeStep.mode    # and bfloat16 ones
    (eager,) = run(bench_job(base_targets(handle.model, ("fp32",), layer_names=names,
                                          kernels="torch"), 384, 6, 4, 1, threads=1))
    assert eager.details["decode_step"] == "eager"
    (compiled,) = run(bench_job(targets[1:], 384, 6, 3, 1, compile=True))
    assert compiled.details["decode_step"].startswith(NativeStep.mode + "; not compiled")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_float32_model_steps_natively_with_its_own_logits(family_dirs, arch):
    """float32 Linears are read as they are (no int8 activations): the step equals the eager
    float forward within float rounding (1e-4), and a block mixing a float layer with native
    ones (a layer a plan keeps) runs too."""
    handle, _ = model_of(family_dirs, arch)
    model = base_targets(handle.model, ("fp32",))[0].build()[0]
    prompt = torch.randint(3, 384, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eager_decoder = LeanDecoder(model, 16, fused=True)
        eager = greedy(eager_decoder.forward, eager_decoder, prompt, 6)
        decoder = LeanDecoder(model, 16, fused=True)
        assert NativeStep.problem(decoder) is None
        native = greedy(NativeStep(decoder), decoder, prompt, 6)
    for a, b in zip(native, eager):
        assert ((a - b).norm() / b.norm()).item() < 1e-4
    kept = ("o_proj", "up_proj")   # a plan keeps these in float; the rest run at 4 bits
    qtensors = {i.name: quantize_rtn(handle.model.get_submodule(i.name).weight.data,
                                     QuantSpec(bits=4, group_size=32))
                for i in handle.quantizable if not i.name.endswith(kept)}
    mixed, _ = kernel_model(handle.model, qtensors)
    with torch.inference_mode():
        eager_decoder = LeanDecoder(mixed, 16, fused=True)
        eager = greedy(eager_decoder.forward, eager_decoder, prompt, 6)
        decoder = LeanDecoder(mixed, 16, fused=True)
        assert NativeStep.problem(decoder) is None
        assert type(decoder.layers[0].self_attn.o_proj) is torch.nn.Linear
        native = greedy(NativeStep(decoder), decoder, prompt, 6)
    for a, b in zip(native, eager):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_bfloat16_model_steps_natively_in_float32(family_dirs, arch):
    """bfloat16 weights are widened to float32 and every sum is float32 (llama.cpp's BF16):
    the blocks then compute what the same weights compute in float32 (the output head stays
    in torch, in bfloat16), closer to that than the eager bfloat16 step, which rounds every
    activation to bfloat16; the same greedy tokens. The prompt's keys go into a float32 cache
    and are read back by the eager prefill in bfloat16, exactly."""
    handle, _ = model_of(family_dirs, arch)
    model = base_targets(handle.model, ("bf16",))[0].build()[0]
    exact = base_targets(model, ("fp32",))[0].build()[0]     # the bf16 weights, in float32
    prompt = torch.randint(3, 384, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        reference_decoder = LeanDecoder(exact, 16, fused=True)
        reference = greedy(reference_decoder.forward, reference_decoder, prompt, 6)
        eager_decoder = LeanDecoder(model, 16, fused=True)
        eager = greedy(eager_decoder.forward, eager_decoder, prompt, 6)
        decoder = LeanDecoder(model, 16, fused=True)
        assert NativeStep.problem(decoder) is None
        step = NativeStep(decoder)
        assert decoder.keys.dtype == torch.float32
        native = greedy(step, decoder, prompt, 6)
    for i, (a, b, ref) in enumerate(zip(native, eager, reference)):
        if i == 0:        # the prompt: the eager prefill on both sides
            assert torch.equal(a, b)
            continue
        native_error = ((a.float() - ref).norm() / ref.norm()).item()
        eager_error = ((b.float() - ref).norm() / ref.norm()).item()
        assert native_error < 1e-2 and native_error < eager_error, (i, native_error, eager_error)
        assert a.argmax() == ref.argmax(), i


def test_a_mixed_precision_block_runs_its_layers_one_after_another(tiny_dirs):
    """q at 4 bits beside k/v at 8 cannot fuse: the step takes them as three products."""
    from studio.core.kernels import kernel_model
    from studio.core.models import open_model_job
    from studio.core.plan import QuantSpec
    from studio.core.quant.grid import quantize_rtn

    handle = run(open_model_job(tiny_dirs["llama"]))
    specs = {i.name: QuantSpec(bits=8 if i.name.endswith(("k_proj", "v_proj", "up_proj"))
                               else 4, group_size=32) for i in handle.quantizable}
    qtensors = {n: quantize_rtn(handle.model.get_submodule(n).weight.data, s)
                for n, s in specs.items()}
    model, _ = kernel_model(handle.model, qtensors)
    prompt = torch.randint(3, 384, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager_decoder = LeanDecoder(model, 12, fused=True)
        assert eager_decoder.fused_calls == 0
        eager = greedy(eager_decoder.forward, eager_decoder, prompt, 4)
        decoder = LeanDecoder(model, 12, fused=True)
        native = greedy(NativeStep(decoder), decoder, prompt, 4)
    for a, b in zip(native, eager):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.fixture(scope="module")
def relative_dirs(family_dirs, tmp_path_factory, tiny_tokenizer_obj):
    """The families plus a Phi-3 rotating half of each head (partial_rotary_factor 0.5, as
    Phi-4-mini's 0.75)."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from tests.tiny_models import tiny_config

    raw = tiny_config("phi3").to_dict()
    raw["rope_parameters"] = {**raw["rope_parameters"], "partial_rotary_factor": 0.5}
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("phi3_partial")
    AutoModelForCausalLM.from_config(Phi3Config(**raw)).save_pretrained(folder)
    tiny_tokenizer_obj.save_pretrained(folder)
    return {**family_dirs, "phi3_partial": folder}


def enliven(model) -> None:
    """Make every feature the step follows change the logits: random norm weights (Gemma's
    start at 0, so (1 + w) = 1 would hide a norm applied in the wrong place), q/k products 10x
    (attention scores of order 1, not 0.02: a window, a scale or a rotation then matters), and
    soft-caps below those scores and logits (Gemma 2's defaults, 50 and 30, never bite on a
    tiny random model)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                parameter.mul_(10)
    for layer in model.model.layers:
        if getattr(layer.self_attn, "attn_logit_softcapping", None):
            layer.self_attn.attn_logit_softcapping = 1.5
    if getattr(model.config, "final_logit_softcapping", None):
        model.config.final_logit_softcapping = 0.3


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma", "gemma2", "gemma3", "phi3_partial"])
@pytest.mark.parametrize("config", ["fp32", "int4"])
def test_relatives_step_natively_with_the_models_own_logits(relative_dirs, arch, config):
    """Qwen3's per-head q/k norms, Phi-3's fused qkv_proj / gate_up_proj and partial rotation,
    Gemma's GELU, (1 + w) norms and scaled embedding, Gemma 2/3's four norms a block,
    query_pre_attn_scalar, per-layer sliding windows, Gemma 2's soft-capped attention and final
    logits, Gemma 3's q/k norms and local / global rotary bases: each step's logits against the
    model's own forward over the whole sequence so far, past the window of 16 (float32 within
    1e-4; int4, whose step quantizes its inputs to int8, within 2e-2 and the same top token:
    the step sums attention in another order than torch, and an input that falls on an int8
    rounding tie then takes the other code. On an AVX-512 machine Gemma 2's soft-capped
    attention put one of o_proj's inputs at 27.49997 steps: across the tie, o_proj's output
    moved by 0.18%, the logits by 0.7-1.6%; the other families stood within 2e-5)."""
    from studio.core.models import open_model_job

    handle = run(open_model_job(relative_dirs[arch]))
    enliven(handle.model)
    model = base_targets(handle.model, (config,),
                         layer_names=[i.name for i in handle.quantizable])[0].build()[0]
    prompt = torch.randint(3, 384, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        decoder = LeanDecoder(model, 24, fused=True)
        assert NativeStep.problem(decoder) is None
        step = NativeStep(decoder)
        decoder.forward(prompt, 0)
        ids = prompt
        for position in range(7, 22):
            token = torch.randint(3, 384, (1, 1), generator=torch.Generator().manual_seed(position))
            ids = torch.cat([ids, token], dim=1)
            native = step(token, position)
            own = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            error = ((native - own).norm() / own.norm()).item()
            assert error < (1e-4 if config == "fp32" else 2e-2), (position, error)
            assert native.argmax() == own.argmax()


def test_models_it_cannot_run_stay_eager_and_say_why(tiny_dirs, monkeypatch):
    handle, _ = model_of(tiny_dirs, "llama")
    names = [i.name for i in handle.quantizable]
    on_torch = base_targets(handle.model, ("int4",), layer_names=names,
                            kernels="torch")[0].build()[0]
    assert "neither on the native kernels nor a float32 / bfloat16 Linear" in NativeStep.problem(
        LeanDecoder(on_torch, 8, fused=True))
    _, model = model_of(tiny_dirs, "llama")
    hooked = LeanDecoder(model, 8, fused=True)
    hooked.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: None)
    assert NativeStep.problem(hooked) == "block 1's o_proj has hooks"
    # a rotation over an odd number of a head's dimensions (rotate-half pairs them)
    _, model = model_of(tiny_dirs, "llama")
    odd = LeanDecoder(model, 8, fused=True)
    rotary, head_dim = odd.inner.rotary_emb, odd.head_dim
    own = rotary.forward
    monkeypatch.setattr(rotary, "forward",
                        lambda x, at, *rest: tuple(t[..., :-1] for t in own(x, at, *rest)))
    assert NativeStep.problem(odd) == (f"its rotary embedding turns [{head_dim - 1}] of each "
                                       f"head's {head_dim} dimensions, which the step does not "
                                       f"follow")
    monkeypatch.setattr(q4_native, "unavailable", lambda: "no C compiler on this machine")
    assert "unavailable: no C compiler" in LeanRun(model, 8).mode


def test_a_position_outside_the_cache_is_refused(tiny_dirs):
    _, model = model_of(tiny_dirs, "qwen2")
    step = NativeStep(LeanDecoder(model, 8, fused=True))
    with pytest.raises(ValueError, match="outside the cache"):
        step(torch.tensor([[5]]), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [37, 96])
def test_a_float_layer_on_the_kernel_equals_its_float32_product(dtype, k):
    """The step's float products (and its output head): the weights as stored, widened to
    float32, float32 sums; any width (a tail past the vector loop), a bias added."""
    import ctypes

    from studio.core.native_step import _layer

    linear = torch.nn.Linear(k, 70).to(dtype)
    x = torch.randn(1, k)
    keep, y = [], torch.empty(1, 70)
    q4_native.library().q4_float_gemv(ctypes.byref(_layer(linear, keep)), x.data_ptr(),
                                      y.data_ptr(), 2)
    expected = torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float())
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
