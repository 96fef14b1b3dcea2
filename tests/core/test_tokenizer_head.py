"""A tokenizer's added tokens read from the head of tokenizer.json, so transformers does not
parse the whole file in Python (with the interpreter's lock held) to find them."""
import json

import pytest

from studio.core.models import parse_tokenizer
from studio.core.tokenizer_head import (
    HEAD_BYTES,
    added_tokens_kwargs,
    read_added_tokens,
)


def _pythons_json_reads(monkeypatch) -> list[str]:
    read = []
    real = json.load
    monkeypatch.setattr(json, "load", lambda f, *a, **k: (read.append(getattr(f, "name", "")),
                                                           real(f, *a, **k))[1])
    return read


def test_the_tokenizer_is_the_one_transformers_builds_without_reading_its_json_in_python(
        tiny_dirs, monkeypatch):
    from transformers import AutoTokenizer

    folder = tiny_dirs["llama"]
    assert added_tokens_kwargs(folder)            # the folder takes the fast path
    reference = AutoTokenizer.from_pretrained(folder)
    read = _pythons_json_reads(monkeypatch)
    tokenizer, why = parse_tokenizer(folder)
    assert why is None
    assert not [name for name in read if name.endswith("tokenizer.json")]
    assert repr(tokenizer) == repr(reference)     # added tokens, specials and their flags
    text = "<s>def f(x):\n    return x</s> <pad> café"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.all_special_ids == reference.all_special_ids


def test_the_head_gives_what_json_gives(tiny_dirs, tmp_path):
    path = tiny_dirs["llama"] / "tokenizer.json"
    doc = json.loads(path.read_text())
    assert read_added_tokens(path) == doc["added_tokens"]
    # A list longer than the first read is read on.
    doc["added_tokens"] = doc["added_tokens"] + [
        {"id": 10_000 + i, "content": f"<extra_{i}>" + "x" * 200, "single_word": False,
         "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i in range(2 * HEAD_BYTES // 200)]
    long = tmp_path / "tokenizer.json"
    long.write_text(json.dumps(doc, indent=2))
    assert read_added_tokens(long) == doc["added_tokens"]


@pytest.mark.parametrize("layout", ["model first", "truncated", "not json", "no added tokens"])
def test_a_file_laid_out_otherwise_takes_transformers_own_path(tiny_dirs, tmp_path, layout):
    source = tiny_dirs["llama"]
    doc = json.loads((source / "tokenizer.json").read_text())
    text = json.dumps(doc, indent=2)
    if layout == "model first":
        text = json.dumps({"model": doc["model"], **{k: v for k, v in doc.items()
                                                      if k != "model"}})
    elif layout == "truncated":
        text = text[:text.index('"added_tokens"') + 40]
    elif layout == "not json":
        text = "version: 1\n" + text
    else:
        text = json.dumps({k: v for k, v in doc.items() if k != "added_tokens"})
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())
    assert read_added_tokens(tmp_path / "tokenizer.json") is None
    assert added_tokens_kwargs(tmp_path) == {}


def test_files_that_feed_transformers_legacy_branch_keep_it(tiny_dirs, tmp_path):
    """special_tokens_map.json and added_tokens.json are read by the branch this skips, and a
    config that lists its added tokens needs nothing from here."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_dirs["llama"] / name).read_text())
    assert added_tokens_kwargs(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text("{}")
    assert added_tokens_kwargs(tmp_path) == {}
    (tmp_path / "special_tokens_map.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert added_tokens_kwargs(tmp_path) == {}
