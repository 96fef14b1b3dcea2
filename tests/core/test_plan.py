"""Plans: how a layer's spec is resolved, recipes in and out, and clear errors."""
from pathlib import Path

import pytest

from studio.core.errors import StudioError
from studio.core.plan import Plan, QuantSpec, Rule

RECIPES = Path(__file__).resolve().parents[2] / "resources" / "recipes"


def test_exact_beats_regex_beats_default_and_later_regex_wins():
    plan = Plan(default=QuantSpec(bits=4),
                rules=(Rule(r".*mlp.*", QuantSpec(bits=3), regex=True),
                       Rule(r".*down_proj", QuantSpec(bits=8), regex=True),
                       Rule("model.layers.0.mlp.down_proj", None)))
    assert plan.spec_for("model.layers.0.mlp.down_proj") is None  # exact rule: skip
    assert plan.spec_for("model.layers.1.mlp.down_proj").bits == 8  # last matching regex
    assert plan.spec_for("model.layers.1.mlp.up_proj").bits == 3
    assert plan.spec_for("model.layers.1.self_attn.q_proj").bits == 4  # default
    assert plan.spec_for("lm_head", default_applies=False) is None


def test_with_rule_replaces_an_exact_rule():
    plan = Plan().with_rule(Rule("a", QuantSpec(bits=3))).with_rule(Rule("a", QuantSpec(bits=2)))
    assert len(plan.rules) == 1 and plan.spec_for("a").bits == 2


def test_recipe_round_trip(tmp_path):
    plan = Plan(default=QuantSpec(bits=3, group_size=64, method="gptq",
                                  options={"act_order": True}),
                rules=(Rule(r".*\.v_proj", QuantSpec(bits=8, group_size=-1), regex=True),
                       Rule("lm_head", None)),
                architecture="LlamaForCausalLM")
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("changes, message", [
    (dict(bits=1), "Bits"), (dict(bits=9), "Bits"), (dict(group_size=48), "Group size"),
    (dict(method="magic"), "Unknown method"), (dict(options={"alpha": 1}), "no option"),
])
def test_invalid_specs_are_refused(changes, message):
    with pytest.raises(StudioError, match=message):
        QuantSpec(**changes)


def test_rules_must_match_and_architecture_must_agree(tiny_llama):
    plan = Plan(rules=(Rule(r".*\.nothing_here", QuantSpec(), regex=True),))
    with pytest.raises(StudioError, match="matches no layer"):
        plan.resolve(tiny_llama.layers)
    with pytest.raises(StudioError, match="written for GPT2LMHeadModel"):
        Plan(architecture="GPT2LMHeadModel").check_architecture(tiny_llama.architecture)
    with pytest.raises(StudioError, match="not a valid regular expression"):
        Rule("([", None, regex=True)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "a.json").write_text("{nope")
    with pytest.raises(StudioError, match="not valid JSON"):
        Plan.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"format": "other"}')
    with pytest.raises(StudioError, match="not a Compression Studio recipe"):
        Plan.load(tmp_path / "b.json")
    with pytest.raises(StudioError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_bundled_recipes_load_and_resolve(tiny_llama):
    recipes = sorted(RECIPES.glob("*.json"))
    assert recipes
    for path in recipes:
        specs = Plan.load(path).resolve(tiny_llama.layers)
        assert any(spec is not None for spec in specs.values())
