"""A plan in the words of other tools: llama.cpp `--tensor-type` overrides and an
llm-compressor recipe, so users of those tools can apply the studio's bit allocation.

llama.cpp (`llama-quantize --tensor-type PATTERN=TYPE`, or one PATTERN=TYPE per line for
`--tensor-type-file`): PATTERN is a regex searched in GGUF tensor names (blk.N.attn_q.weight,
...). The studio's widths map to k-quants (q2_K ... q6_K) and q8_0; they keep the widths, not
the studio's exact grid (k-quants use 256-weight super-blocks with their own scales). Rows whose
length is not a multiple of 256 cannot hold k-quants: llama-quantize then falls back to another
type, and the export says which, so nobody is surprised by the file size. A GGUF-native spec
(`grid.native_gguf_type`) names its own legacy type (q4_0, q5_0, q8_0), which it is exactly.
The ends are written only when the plan sets them (else llama-quantize's own choice for them
stands, Q6_K / Q8_0 for the output), anchored (`^output\.weight$`: llama.cpp searches, and
"output.weight" is inside every blk.N.attn_output.weight). A tied pair is one GGUF tensor,
`token_embd.weight` (no `output.weight`: llama.cpp reads the output from it), so it is one line;
another embedding (GPT-2's positional wpe) is `position_embd`, anchored too;
planned apart, the GGUF still holds one matrix and the lm_head's type is used (its error
reaches every logit), with a note.

llm-compressor: a recipe stage with one modifier per method (each method declares its
llm-compressor modifier in the registry, `Quantizer.llm_compressor`: QuantizationModifier for
RTN, GPTQModifier, AWQModifier, SmoothQuantModifier + QuantizationModifier), each with
`config_groups` whose `targets` name the layers exactly ("re:^name$") and whose `weights` give
num_bits / symmetric / strategy group|channel / group_size, as compressed-tensors defines them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.errors import StudioError
from studio.core.files import write_text_atomic
from studio.core.plan import Plan, QuantSpec
from studio.core.quant.grid import native_gguf_type

QK_K = 256  # llama.cpp k-quant super-block

# Role of a layer -> its GGUF tensor name inside block N (llama.cpp's tensor map).
GGUF_ROLES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
              "qkv": "attn_qkv", "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up",
              "down": "ffn_down"}
GGUF_GLOBAL = {"embedding": "token_embd", "lm_head": "output"}
# An embedding that is not the token one (GPT-2's wpe, read by position): llama.cpp's
# LLM_TENSOR_POS_EMBD, the name gguf-py's tensor map gives transformer.wpe.
POSITION_EMBD = "position_embd"
# Bits -> ggml type; 7 bits has no ggml type and takes q8_0.
GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0"}
# What llama-quantize uses instead when a row is not a multiple of 256 (llama-quant.cpp).
KQUANT_FALLBACK = {"q2_K": "iq4_nl", "q3_K": "iq4_nl", "q4_K": "q5_0", "q5_K": "q5_1",
                   "q6_K": "q8_0"}

@dataclass
class Export:
    text: str
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.text)


def _resolved(handle, plan: Plan) -> dict[str, QuantSpec | None]:
    plan.check_architecture(handle.architecture)
    return plan.resolve(handle.layers)


# --- llama.cpp -------------------------------------------------------------------------------

def gguf_name(info, token_ends: set[str] | None = None) -> str:
    """The GGUF tensor name (without ".weight") of a layer, or a StudioError saying why not.
    `token_ends`: the model's ends (`plan_ends.end_names`); an embedding outside them is a
    positional table, `position_embd`."""
    if info.role == "embedding" and token_ends is not None and info.name not in token_ends:
        return POSITION_EMBD
    if info.role in GGUF_GLOBAL:
        return GGUF_GLOBAL[info.role]
    if info.block is None or info.role not in GGUF_ROLES:
        raise StudioError(f"{info.name} has no llama.cpp tensor name this studio knows "
                          f"(role {info.role}); the llama.cpp export covers attention and MLP "
                          f"projections, embeddings and the output layer.")
    return f"blk.{info.block}.{GGUF_ROLES[info.role]}"


def ggml_type(spec: QuantSpec | None) -> str:
    if spec is None:
        return "f16"
    native = native_gguf_type(spec)
    return native.name.lower() if native is not None else GGML_TYPES[spec.bits]


def llama_cpp_overrides(handle, plan: Plan) -> list[tuple[str, str]]:
    """[(regex, ggml type)] for every block layer in model order, then the ends the plan
    sets (see the module notes)."""
    from studio.core.plan_ends import end_names

    specs = _resolved(handle, plan)
    ends = end_names(handle.layers)
    pairs = []
    for info in handle.layers:
        if info.name in ends or (specs[info.name] is None and not info.quantizable):
            continue  # the ends below; a layer outside the blocks the plan leaves alone
        name = gguf_name(info, ends)
        # Names outside the blocks are anchored: a bare one could be inside another's.
        pattern = (f"^{name}\\.weight$" if info.block is None else re.escape(name) + r"\.weight")
        pairs.append((pattern, ggml_type(specs[info.name])))
    return pairs + [(f"^{re.escape(name)}\\.weight$", ggml_type(spec))
                    for name, spec, _ in end_overrides(handle, plan)]


def end_overrides(handle, plan: Plan) -> list[tuple[str, QuantSpec | None, str]]:
    """(GGUF tensor name, spec, note) for each end the plan sets: "token_embd" once for a
    tied pair (the lm_head's spec when the two are planned apart, noted), else "output" and
    "token_embd" each."""
    from studio.core.plan_ends import end_setting, ends_of

    out = []
    for end in ends_of(handle.layers):
        if not any(r.matches(n) for r in plan.rules for n in end.names):
            continue   # not set: llama-quantize's own choice for it stands
        spec, apart = end_setting(plan, handle.layers, end)
        if end.tied:
            note = (f"The plan sets the tied {' and '.join(end.names)} apart, but a GGUF holds "
                    f"them as one tensor (token_embd.weight): it takes the lm_head's "
                    f"{ggml_type(spec)}." if apart else "")
            out.append(("token_embd", spec, note))
        else:
            out.append((GGUF_GLOBAL[end.roles[0]], spec, ""))
    return out


def llama_cpp_export(handle, plan: Plan) -> Export:
    """One PATTERN=TYPE line per tensor (a --tensor-type-file), with notes on fallbacks."""
    from studio.core.plan_ends import end_names

    specs = _resolved(handle, plan)
    pairs = llama_cpp_overrides(handle, plan)
    ends = end_overrides(handle, plan)
    rows = {GGUF_GLOBAL[i.role]: i.shape[1] for i in handle.layers if i.role in GGUF_GLOBAL}
    written = [(info.name, specs[info.name], info.shape[1]) for info in handle.layers
               if info.name not in end_names(handle.layers) and specs[info.name] is not None]
    written += [(f"{name}.weight", spec, rows[name]) for name, spec, _ in ends if spec]
    notes = [note for _, _, note in ends if note]
    fallback: dict[tuple[str, str], int] = {}
    for name, spec, width in written:
        kind = ggml_type(spec)
        if kind in KQUANT_FALLBACK and width % QK_K:
            key = (kind, KQUANT_FALLBACK[kind])
            fallback[key] = fallback.get(key, 0) + 1
        if spec.bits == 7:
            notes.append(f"{name}: 7 bits has no ggml type; q8_0 is used.")
    for name, spec, _ in ends:
        flag = "--token-embedding-type" if name == "token_embd" else "--output-tensor-type"
        notes.append(f"{name}.weight -> {ggml_type(spec)} (the same as llama-quantize {flag} "
                     f"{ggml_type(spec)}).")
    if any(pattern == f"^{POSITION_EMBD}\\.weight$" for pattern, _ in pairs):
        notes.append(f"{POSITION_EMBD}.weight: llama-quantize never quantizes positional "
                     f"embeddings (llama-quant.cpp is_quantizable): its line records the plan "
                     f"but llama-quantize keeps the table as it is.")
    for (kind, other), count in sorted(fallback.items()):
        notes.append(f"{count} tensor(s) planned as {kind} have rows that are not a multiple of "
                     f"{QK_K}; llama-quantize will store them as {other} instead.")
    if any(s is not None and native_gguf_type(s) is None for s in specs.values()):
        notes.append("ggml types keep the planned widths, not the studio's exact grid (k-quants "
                     "use 256-weight super-blocks with 6-bit sub-block scales).")
    text = "".join(f"{pattern}={kind}\n" for pattern, kind in pairs)
    return Export(text, notes)


def llama_cpp_args(handle, plan: Plan) -> list[str]:
    """The same overrides as llama-quantize arguments: ["--tensor-type", "PATTERN=TYPE", ...]."""
    args: list[str] = []
    for pattern, kind in llama_cpp_overrides(handle, plan):
        args += ["--tensor-type", f"{pattern}={kind}"]
    return args


# --- llm-compressor --------------------------------------------------------------------------

def weights_scheme(spec: QuantSpec) -> dict:
    """compressed-tensors QuantizationArgs for the weights of `spec`."""
    scheme = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric}
    if spec.group_size == -1:
        scheme["strategy"] = "channel"
    else:
        scheme.update(strategy="group", group_size=spec.group_size)
    if "act_order" in spec.quantizer.defaults() and spec.option("act_order"):
        scheme["actorder"] = "weight"
    return scheme


def _modifier_options(method: str, specs: list[QuantSpec]) -> dict:
    options = {tuple(sorted(s.options.items())) for s in specs}
    if len(options) > 1:
        raise StudioError(f"An llm-compressor recipe takes one set of {method} options, but the "
                          f"plan uses {len(options)} different ones; make them equal first.")
    translate = specs[0].quantizer.llm_compressor_options
    return {} if translate is None else dict(translate(specs[0]))


def llm_compressor_recipe(handle, plan: Plan) -> dict:
    """The recipe as a dict (one stage, one modifier per method)."""
    specs = _resolved(handle, plan)
    quantized = {n: s for n, s in specs.items() if s is not None}
    if not quantized:
        raise StudioError("The plan quantizes no layer, so there is no recipe to write.")
    kept = [n for n, s in specs.items() if s is None]
    ignore = kept if "lm_head" in kept or "lm_head" in quantized else ["lm_head", *kept]
    modifiers: dict[str, dict] = {}
    unknown = sorted({s.method for s in quantized.values() if s.quantizer.llm_compressor is None})
    if unknown:
        raise StudioError(f"llm-compressor has no equivalent of {', '.join(unknown)}; a plan "
                          f"using it cannot be written as an llm-compressor recipe.")
    sq = [s for s in quantized.values() if s.quantizer.smoothing]
    if sq:
        alphas = {s.option("alpha") for s in sq}
        if len(alphas) > 1:
            raise StudioError("An llm-compressor recipe takes one SmoothQuant alpha; the plan "
                              "uses several.")
        modifiers["SmoothQuantModifier"] = {"smoothing_strength": alphas.pop()}
    by_method: dict[str, dict[tuple, list[str]]] = {}
    for name, spec in quantized.items():
        key = (spec.bits, spec.group_size, spec.symmetric)  # options go on the modifier
        by_method.setdefault(spec.method, {}).setdefault(key, []).append(name)
    for method, groups in by_method.items():
        modifier = quantized[groups[next(iter(groups))][0]].quantizer.llm_compressor
        if modifier in modifiers:
            raise StudioError(f"llm-compressor runs {method} layers through the same {modifier} "
                              f"as another method of the plan; a plan mixing them cannot be "
                              f"written as one recipe.")
        specs_of = [s for s in quantized.values() if s.method == method]
        config_groups = {}
        for index, ((bits, group_size, symmetric), names) in enumerate(groups.items()):
            spec = specs_of[0].with_(bits=bits, group_size=group_size, symmetric=symmetric)
            group = {"targets": [f"re:^{re.escape(n)}$" for n in names],
                     "weights": weights_scheme(spec)}
            if specs_of[0].quantizer.smoothing:
                bits = specs_of[0].option("act_bits")
                group["input_activations"] = {"num_bits": bits, "type": "int", "symmetric": True,
                                               "strategy": "token", "dynamic": True}
            config_groups[f"group_{index}"] = group
        modifiers[modifier] = {**_modifier_options(method, specs_of), "ignore": ignore,
                               "config_groups": config_groups}
    return {"quant_stage": {"quant_modifiers": modifiers}}


def llm_compressor_export(handle, plan: Plan) -> Export:
    import yaml

    recipe = llm_compressor_recipe(handle, plan)
    header = (f"# llm-compressor recipe written by Compression Studio for {handle.architecture}.\n"
              f"# Apply with: oneshot(model=..., recipe=\"this file\", dataset=...)\n")
    notes = ["Targets name every layer exactly, so the recipe applies to this architecture "
             "and layer count only."]
    return Export(header + yaml.safe_dump(recipe, sort_keys=False, width=100), notes)
