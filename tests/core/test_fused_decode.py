"""Decode without per-step overhead: q/k/v and gate/up fused into one call each. Tolerance:
the fused step's logits equal the unfused lean decoder's to 1e-5 relative (each output column
is the same dot product) and the model's own eager forward to 1e-4 (as the lean decoder does)."""
import copy

import pytest
import torch

from studio.core import q4_native
from studio.core.bench import base_targets
from studio.core.fuse import fuse
from studio.core.jobs import run
from studio.core.kernels import Int4Linear, Int8Linear
from studio.core.lean_decoder import LeanDecoder
from studio.core.q4_native import NativeLinear


def steps(decoder, prompt, count=5):
    logits = [decoder.forward(prompt, 0)]
    position = prompt.shape[1]
    for _ in range(count):
        logits.append(decoder.forward(logits[-1].argmax(-1, keepdim=True), position))
        position += 1
    return torch.stack(logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decode_equals_unfused_and_the_eager_forward(tiny_dirs, arch):
    from studio.core.models import open_model_job

    handle = run(open_model_job(tiny_dirs[arch]))
    names = [i.name for i in handle.quantizable]
    prompt = torch.randint(3, 384, (1, 10), generator=torch.Generator().manual_seed(0))
    for target in base_targets(handle.model, ("fp32", "int8", "int4"), layer_names=names):
        model, _ = target.build()
        with torch.inference_mode():
            plain = steps(LeanDecoder(model, 20), prompt)
            eager = model(input_ids=prompt).logits[:, -1]
            decoder = LeanDecoder(model, 20, fused=True)
            assert decoder.fused_calls == 2 * len(decoder.layers), target.name
            fused = steps(decoder, prompt)
            eager_after = model(input_ids=prompt).logits[:, -1]   # the originals still work
        rel = ((fused - plain).norm() / plain.norm()).item()
        assert rel < 1e-5, (target.name, rel)
        torch.testing.assert_close(fused[0], eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eager_after, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int4", [
    "torch", pytest.param("native", marks=pytest.mark.skipif(bool(q4_native.unavailable()),
                                                             reason="no native kernel here"))])
def test_fusing_shares_the_weights_and_refuses_what_it_cannot(tiny_llama, int4):
    model, _ = base_targets(tiny_llama.model, ("int4",), kernels=int4,
                            layer_names=[i.name for i in tiny_llama.quantizable])[0].build()
    attention = model.model.layers[0].self_attn
    q = attention.q_proj
    assert isinstance(q, Int4Linear if int4 == "torch" else NativeLinear)
    fused = fuse([attention.q_proj, attention.k_proj, attention.v_proj])
    if int4 == "torch" and attention.k_proj.block_n is None:
        # torch packs int4 rows in blocks of the CPU's width (64 with AVX-512): k's 32 rows
        # are no whole block, so the packed buffers cannot be laid end to end
        assert fused is None
        return
    assert fused is not None and fused.sizes == [q.out_features, attention.k_proj.out_features,
                                                 attention.v_proj.out_features]
    buffer = "packed" if int4 == "torch" else "codes"
    assert getattr(q, buffer).data_ptr() == getattr(fused.module, buffer).data_ptr()  # one copy
    dense = copy.deepcopy(tiny_llama.model.model.layers[0].self_attn)
    assert fuse([attention.q_proj, dense.k_proj]) is None            # mixed kinds
    dense.q_proj.register_forward_pre_hook(lambda m, args: None)
    assert fuse([dense.q_proj, dense.k_proj, dense.v_proj]) is None  # input hooks
    assert Int8Linear  # (int8 fusion is covered by the logits test above)
