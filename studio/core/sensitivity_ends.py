"""The sensitivity sweep's rows for the model's ends (`sensitivity.py` measures the block
layers), so the allocator can choose their width (`plan --lm-head auto`).

The model's ends are measured too, so the allocator can choose their width (`plan --lm-head
auto`): each `plan_ends.End` (the lm_head, an untied embedding, or a tied pair as one unit,
since quantizing the shared matrix changes both ends) is one more row after the layers, named
by its first layer and listed in `ends`. Its proxy is the head's relative output error on the
captured final hidden states (on a seeded sample of `END_ROWS` of its rows: quantization is
row by row, so each sampled row's error is exact, and a 262k-row head would otherwise cost
more than every block linear together) plus, for an embedding, the relative error of the rows
the text looks up. The capture stops at the head's input, so no logits are computed for the
proxy. Its KL runs the whole model with the quantized matrix substituted
(`torch.func.functional_call`, tied parameters kept tied), the user's model untouched; an
untied embedding quantizes only the rows the text looks up (`embedded_rows`).
"""
from __future__ import annotations

import numpy as np
import torch

from studio.core.metrics import output_error
from studio.core.plan import QuantSpec
from studio.core.quant.blocks import call_block
from studio.core.quant.rtn import quantized_values
from studio.core.streaming import real

END_ROWS = 4096             # rows of an lm_head in its proxy sample (module notes)


class _Embedded(Exception):
    """Block 0 has its input: the rest of the forward is not needed."""


def measured_ends(handle) -> list:
    """The model's ends the sweep measures (`plan_ends.ends_of`: a tied pair is one unit)."""
    from studio.core.plan_ends import ends_of

    return ends_of(handle.layers)


def end_shape(handle, end) -> tuple[int, int]:
    return tuple(next(i.shape for i in handle.layers if i.name == end.names[0]))


def end_proxy(handle, end, x: torch.Tensor | None, ids: torch.Tensor,
              options: list[QuantSpec], seed: int) -> np.ndarray:
    """The proxy of one end unit at every option (module notes): the head's relative output
    error on its captured inputs `x` over a seeded sample of its rows, plus, for an embedding
    (a tied pair has both), the relative error of the rows the tokens `ids` look up."""
    w = handle.weight(end.names[0]).float()
    errors = np.zeros(len(options))
    if "lm_head" in end.roles and x is not None:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(w.shape[0], generator=generator)[:END_ROWS].sort().values
        sample = w[rows]
        energy = (x @ sample.T).pow(2).sum().item()
        errors += [output_error(x, sample, quantized_values(sample, o), energy) for o in options]
    if "embedding" in end.roles:
        looked = w[ids]
        energy = looked.pow(2).sum().item()
        errors += [(quantized_values(looked, o) - looked).pow(2).sum().item() / max(energy, 1e-30)
                   for o in options]
    return errors


def end_logits(model, end, spec, ids, hidden, inputs, blocks, head) -> torch.Tensor:
    """The logits with only the end unit `end` quantized at `spec`, on the same path as the
    baseline's: the cached last hidden states through a quantized head, or, when the unit
    holds the embedding (a tied pair: both sides change), the blocks re-run from what the
    quantized embedding gives block 0."""
    params = dict(model.named_parameters(remove_duplicate=False))
    weight = real(params[f"{end.names[0]}.weight"])   # a streamed model's: read from its file
    if "lm_head" not in end.roles:   # an untied embedding: only the rows the text reads
        h = embedded_rows(model, model.get_submodule(end.names[0]), weight, ids, spec,
                          blocks[0])
        for index, block in enumerate(blocks):
            h = call_block(block, h, inputs.at(index))
        return head(h)
    wq = quantized_values(weight.detach().float(), spec)
    h = hidden[-1]
    if "embedding" in end.roles:
        h = embedded(model, ids, {f"{n}.weight": wq.to(params[f"{n}.weight"].dtype)
                                  for n in end.names}, blocks[0])
        for index, block in enumerate(blocks):
            h = call_block(block, h, inputs.at(index))
    return head(h, wq)


def embedded_rows(model, embedding, weight: torch.Tensor, ids: torch.Tensor, spec,
                  first_block) -> torch.Tensor:
    """What block 0 receives with an untied embedding quantized at `spec`, quantizing only the
    rows `ids` look up (RTN is row by row, so they are exact): a 128k x 2048 table took 40 s
    per option to quantize whole, its 8k looked-up rows 2.4 s (under load), and no second
    copy of the table is made. The embedding module itself runs on those rows (its own scale,
    Gemma's, kept)."""
    from torch.func import functional_call

    rows = torch.unique(ids)
    table = quantized_values(weight[rows].detach().float(), spec).to(weight.dtype)

    inside = []   # the module re-runs under its own hook: that call is left alone

    def quantized(module, args, output):
        if inside:
            return None
        inside.append(True)
        try:
            return functional_call(module, {"weight": table},
                                   args=(torch.searchsorted(rows, args[0]),))
        finally:
            inside.pop()

    hook = embedding.register_forward_hook(quantized)
    try:
        return embedded(model, ids, {}, first_block)
    finally:
        hook.remove()


def embedded(model, ids: torch.Tensor, params: dict, first_block) -> torch.Tensor:
    """What block 0 receives [n, seq, d] when the model runs with `params` substituted
    (`torch.func.functional_call`: nothing of the model is changed, tied weights stay tied),
    one window at a time as `capture_block_inputs` captured the baseline's."""
    from torch.func import functional_call

    grabbed = []

    def grab(module, args, kwargs):
        grabbed.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())
        raise _Embedded

    hook = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in ids:
            try:
                kwargs = {"input_ids": row[None], "use_cache": False}
                if params:
                    functional_call(model, params, args=(), kwargs=kwargs)
                else:
                    model(**kwargs)
            except _Embedded:
                pass
    finally:
        hook.remove()
    return torch.cat(grabbed)
