"""Models built from a config and tensors already at hand, without transformers' loading path.

`from_pretrained` is general: it re-maps legacy checkpoint names (compiling a regular expression
per key: ~1 s on the demo), initialises every weight it is about to overwrite, and reads the
files it is given. A GGUF's cached folder is the studio's own: its keys are the model's state
dict keys and its tensors float32. Such a model is built here from a skeleton whose parameters
sit on the meta device (nothing initialised, nothing allocated) and whose buffers are real
(rotary frequencies are computed from the config, not stored), then takes the tensors as its
parameters without a copy.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from studio.core.errors import ModelLoadError


def skeleton(config) -> nn.Module:
    """The model `config` describes, entirely on the meta device, its initialisers skipped
    (on meta they still run, through decompositions: ~0.5 s for the demo). Callers only read
    it: the last one is kept for the next call with the same config object (an open checks
    the blocks and counts the parameters of one skeleton)."""
    from transformers import AutoModelForCausalLM

    if _last and _last[0] is config:
        return _last[1]
    with torch.device("meta"), no_init():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.tie_weights()   # (transformers ties in the initialisation skipped here)
    _last[:] = [config, model]
    return model


_last: list = []   # [config, its skeleton]


def model_from_tensors(config, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A float32 model in eval mode, no gradients, holding `tensors` (state-dict keys) as its
    parameters. A tensor the model needs and `tensors` lacks (beyond a tied head), or a tensor
    the model has no place for, is refused, naming it."""
    from transformers import AutoModelForCausalLM

    from studio.core.streaming import parameters_on_meta

    # Initialisation skipped: parameters are all replaced, and buffers are computed by the
    # modules' constructors (a test compares every buffer with the loader's on every family).
    with parameters_on_meta(), no_init():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    floats = {key: t if t.dtype == torch.float32 else t.float() for key, t in tensors.items()}
    _, unexpected = model.load_state_dict(floats, strict=False, assign=True)
    model.tie_weights()   # a tied head follows the embedding it was just given
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if unexpected or missing:
        what = f"no place for {unexpected[0]}" if unexpected else f"no tensor for {missing[0]}"
        raise ModelLoadError(f"The weights in {where} do not fit the model its config "
                             f"describes: {what}.")
    model.eval()
    model.requires_grad_(False)
    return model


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, read whole."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@contextlib.contextmanager
def no_init():
    """transformers' `no_init_weights` (it swaps torch's initialisers for no-ops while open)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield
