"""Every family the studio covers opens and takes every method; what it cannot handle is refused
from config.json (or the GGUF header) before any weight is read, naming what is missing."""
import json

import pytest
import torch

from studio.core.errors import ModelLoadError
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.quantize import quantize_job
from studio.core.text import text_windows
from tests.tiny_models import FAMILIES


@pytest.fixture(scope="module")
def handles(family_dirs):
    return {arch: run(open_model_job(family_dirs[arch])) for arch in FAMILIES}


# One job per family covers all four methods, each on its own kind of layer (regexes over every
# family's names): AWQ on the attention inputs, SmoothQuant on the MLP's first linear(s), GPTQ on
# the MLP's last, RTN on the attention output.
RULES = (("smoothquant", r".*(mlp\.(gate_proj|up_proj|gate_up_proj|c_fc)|fc1)"),
         ("gptq", r".*(down_proj|mlp\.c_proj|fc2)"),
         ("rtn", r".*(o_proj|out_proj|attn\.c_proj)"))


def every_method_plan() -> Plan:
    spec = QuantSpec(8, 32, method="awq", options={"grid": 4, "clip": False})
    rules = tuple(Rule(pattern, QuantSpec(8, 32, symmetric=m == "smoothquant", method=m), True)
                  for m, pattern in RULES)
    return Plan(spec, rules)


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_method_runs_on_every_family(handles, arch):
    """8-bit variants stay close to the baseline (a method that scaled, smoothed or rounded
    wrongly on a family would not), with every method used on every family."""
    handle = handles[arch]
    windows, label = text_windows(handle.tokenizer, None, 32, 16, seed=0)
    ids = windows[:2]
    with torch.no_grad():
        reference = handle.model(input_ids=ids).logits
    variant = run(quantize_job(handle, every_method_plan(), windows, label, arch))
    used = {variant.specs[name].method for name in variant.qtensors}
    assert used == {"awq", *(m for m, _ in RULES)}, f"{arch}: only {sorted(used)} ran"
    with torch.no_grad():
        logits = variant.model(input_ids=ids).logits
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error < 0.1, f"{arch}: relative logit error {error:.3f}"


def write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config, message", [
    (dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=64),
     "bert model .BertForMaskedLM., which is not a causal language model"),
    (dict(model_type="fancy_lm", architectures=["FancyForCausalLM"],
          auto_map={"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}),
     "asks to run its own Python code"),
    (dict(model_type="llama", architectures=["LlamaForCausalLM"],
          quantization_config={"quant_method": "gptq", "bits": 4}),
     "already quantized with gptq"),
    (dict(model_type="t5", architectures=["T5ForConditionalGeneration"]),
     "not a causal language model"),
])
def test_refused_before_any_loading(tmp_path, config, message):
    # No weights in the folder: a refusal naming the model (not "no weights") shows that the
    # config alone decided.
    folder = write_config(tmp_path / "model", **config)
    with pytest.raises(ModelLoadError, match=message):
        run(open_model_job(folder))


def test_a_gguf_transformers_cannot_read_is_refused_from_its_header(tmp_path):
    import gguf

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_uint32("rwkv6.block_count", 1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="holds a 'rwkv6' model, which transformers' GGUF "
                                             "loader cannot read"):
        run(open_model_job(path))


@pytest.mark.parametrize("arch", FAMILIES)
def test_block_by_block_reproduces_the_forward(handles, arch):
    """What GPTQ, AWQ, SmoothQuant and the KL sweep run on: each block with its own arguments
    (Gemma-2/3's full-attention layers get other masks and rotary embeddings than block 0)."""
    from studio.core.quant.blocks import call_block, capture_block_inputs, decoder_blocks

    model = handles[arch].model
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    _, blocks = decoder_blocks(model)
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, []).append(
        out[0] if isinstance(out, tuple) else out)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None])
    finally:
        for hook in hooks:
            hook.remove()
    inputs = capture_block_inputs(model, ids)
    hidden = inputs.hidden
    with torch.no_grad():
        for index, block in enumerate(blocks):
            hidden = call_block(block, hidden, inputs.at(index))
            torch.testing.assert_close(hidden, torch.cat(seen[index]), rtol=1e-5, atol=1e-5)
