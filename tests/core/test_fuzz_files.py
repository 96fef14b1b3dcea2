"""The fuzz harness's bounded pass: every file kind mutated a few hundred times (a few dozen for
the slow kinds), each kind capped at a few seconds. A longer run: benchmarks/fuzz_files.py."""
import json

import pytest

from studio.core.errors import StudioError
from tests.fuzz.harness import Kind, fuzz_kind, make_kinds

# (iterations, seconds cap) per kind: the whole pass stays under ~45 s on a busy machine
BUDGET = {"gguf": (500, 6), "safetensors": (500, 6), "config": (120, 9), "recipe": (400, 5),
          "sensitivity": (300, 6), "variant": (250, 9), "variant_tied": (200, 6),
          "session": (250, 6)}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, tiny_dirs, tiny_llama):
    return make_kinds(tmp_path_factory.mktemp("fuzz"), tiny_dirs["llama"], tiny_llama)


@pytest.mark.parametrize("name", list(BUDGET))
def test_mutated_files_end_in_a_studio_error_or_load(kinds, name):
    iterations, seconds = BUDGET[name]
    kinds[name].load()  # the unmutated file loads
    stats = fuzz_kind(kinds[name], seed=0, iterations=iterations, seconds=seconds)
    assert stats.iterations >= min(iterations, 10)
    assert stats.refused > 0, "no mutant was refused: the mutations do not reach the loader"
    assert not stats.findings, "\n".join(str(f) for f in stats.findings[:10])
    for file in kinds[name].files:  # the seeds are restored
        assert file.exists()
    kinds[name].load()


def test_the_harness_reports_what_is_not_a_studio_error(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps({"a": [1, 2, 3], "b": {"c": "x"}}))

    def naive_loader():
        data = json.loads(path.read_text())  # lets JSONDecodeError, KeyError... escape
        if not isinstance(data, dict):
            raise StudioError("not an object")
        return sum(data["a"]) + len(data["b"]["c"])

    stats = fuzz_kind(Kind("naive", [path], naive_loader, json_like=True), iterations=200)
    assert stats.findings and stats.accepted
    assert json.loads(path.read_text())["a"] == [1, 2, 3]  # restored after the run


def test_a_hostile_alias_in_a_tied_variant_is_refused_by_name(kinds):
    """variant.json's "codes_of" (a tied embedding holding its lm_head's codes) pointing at
    itself, at a layer of another shape, at another alias, or at nothing: a clear refusal."""
    kind = kinds["variant_tied"]
    [path] = kind.files
    original = path.read_text()
    doc = json.loads(original)
    layers = doc["layers"]
    [follower] = [n for n, info in layers.items() if "codes_of" in info]
    leader = layers[follower]["codes_of"]
    block = next(n for n in layers if n not in (follower, leader))
    cases = [({follower: {"codes_of": follower}}, "holds the codes of"),
             ({follower: {"codes_of": "no.such.layer"}}, "holds the codes of"),
             ({follower: {"codes_of": 7}}, "holds the codes of"),
             ({follower: {"codes_of": block}}, "does not quantize at that shape"),
             ({leader: {"codes_of": follower}}, "holds the codes of")]
    try:
        for edit, message in cases:
            changed = json.loads(original)
            for name, fields in edit.items():
                changed["layers"][name].update(fields)
            path.write_text(json.dumps(changed))
            with pytest.raises(StudioError, match=message):
                kind.load()
    finally:
        path.write_text(original)
    kind.load()
