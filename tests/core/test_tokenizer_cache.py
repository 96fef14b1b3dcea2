"""A model's tokenizer is parsed in the studio's process once; later opens tokenize text in a
child process, with exactly the same ids, BOS and token texts."""
import os
import shutil

import pytest
import torch

from studio.core import models, tokenizer_cache
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.text import bos_label, bos_token, builtin_text, text_windows, tokenize
from studio.core.tokenizer_cache import SpawnedTokenizer

TEXT = builtin_text()[:30_000] + "\n\tnaïve 東京 🙂 <s> </s>  end"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenizers"


@pytest.fixture
def bos_folder(tiny_dirs, tmp_path):
    """The tiny Llama whose tokenizer puts <s> in front of every text."""
    folder = tmp_path / "bos-llama"
    shutil.copytree(tiny_dirs["llama"], folder)
    tokenizer, _ = models.parse_tokenizer(folder)
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(folder)
    return folder


def opened_twice(folder):
    first = run(open_model_job(folder))
    real = first.tokenizer
    return real, run(open_model_job(folder)).tokenizer


@pytest.mark.parametrize("which", ["plain", "bos"])
def test_a_second_open_tokenizes_in_a_child_exactly_as_the_parsed_tokenizer(
        which, tiny_dirs, bos_folder, cache, monkeypatch):
    folder = tiny_dirs["llama"] if which == "plain" else bos_folder
    real, spawned = opened_twice(folder)
    assert not isinstance(real, SpawnedTokenizer) and isinstance(spawned, SpawnedTokenizer)
    assert len(list(cache.iterdir())) == 1

    def no_parse(folder):
        raise AssertionError("the tokenizer was parsed in the studio's process")
    monkeypatch.setattr(models, "parse_tokenizer", no_parse)
    assert torch.equal(tokenize(spawned, TEXT), tokenize(real, TEXT))
    for setting in ("auto", "yes", "no"):
        assert bos_token(spawned, setting) == bos_token(real, setting)
    assert (bos_token(spawned, "auto") is not None) == (which == "bos")
    assert bos_label(spawned, 1) == bos_label(real, 1) == "<s>"
    ours, label = text_windows(spawned, None, 16, 3, seed=1)
    theirs, their_label = text_windows(real, None, 16, 3, seed=1)
    assert torch.equal(ours, theirs) and label == their_label
    ids = tokenize(real, TEXT)[:400].tolist()
    assert [spawned.decode([i]) for i in ids] == [real.decode([i]) for i in ids]
    assert len(spawned) == len(real)


def test_other_questions_and_changes_go_to_the_real_tokenizer(tiny_dirs, cache):
    real, spawned = opened_twice(tiny_dirs["llama"])
    assert spawned.convert_ids_to_tokens([5, 6]) == real.convert_ids_to_tokens([5, 6])
    assert spawned("ab cd")["input_ids"] == real("ab cd")["input_ids"]     # with specials
    assert spawned.decode([5, 6]) == real.decode([5, 6])
    assert not spawned.adds_bos
    spawned.add_bos_token = True       # set on the real one; the entry no longer describes it
    assert spawned.real().add_bos_token and spawned.adds_bos
    assert bos_token(spawned, "auto") == 1


def test_a_tokenizer_the_child_encodes_differently_is_not_kept(tiny_dirs, cache, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "run_worker", lambda backend, text: None)
    real, again = opened_twice(tiny_dirs["llama"])
    assert not isinstance(again, SpawnedTokenizer)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_failing_child_leaves_the_ids_right(tiny_dirs, cache, monkeypatch):
    real, spawned = opened_twice(tiny_dirs["llama"])
    monkeypatch.setattr(tokenizer_cache, "run_worker", lambda backend, text: None)
    assert torch.equal(tokenize(spawned, TEXT + "!"), tokenize(real, TEXT + "!"))


def test_a_changed_tokenizer_file_makes_a_new_entry(tiny_dirs, tmp_path, cache):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_dirs["llama"], folder)
    opened_twice(folder)
    config = folder / "tokenizer_config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not isinstance(run(open_model_job(folder)).tokenizer, SpawnedTokenizer)
    assert len(list(cache.iterdir())) == 2


def test_a_broken_entry_is_parsed_again(tiny_dirs, cache):
    opened_twice(tiny_dirs["llama"])
    entry = next(cache.iterdir())
    (entry / "meta.json").write_text("{not json")
    assert not isinstance(run(open_model_job(tiny_dirs["llama"])).tokenizer, SpawnedTokenizer)
    assert isinstance(run(open_model_job(tiny_dirs["llama"])).tokenizer, SpawnedTokenizer)


def test_the_demo_in_a_child_gives_the_same_wikitext_ids(cache, shared_data):
    if not models.demo_available():
        pytest.skip("demo model not installed")
    real, spawned = opened_twice("demo")
    text = (shared_data / "wikitext2_test.txt").read_text(encoding="utf-8")
    ids = tokenize(spawned, text)
    assert torch.equal(ids, tokenize(real, text)) and ids.numel() > 250_000
    assert bos_token(spawned, "auto") == bos_token(real, "auto")


def test_only_the_entries_used_last_are_kept(tiny_dirs, tmp_path, cache, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "KEEP_ENTRIES", 2)

    def tokenizer_of(name):
        folder = tmp_path / name
        if not folder.exists():
            shutil.copytree(tiny_dirs["llama"], folder)
        return run(open_model_job(folder)).tokenizer

    tokenizer_of("a")
    tokenizer_of("b")
    for age, entry in enumerate(sorted(cache.iterdir(), key=lambda e: e.stat().st_mtime_ns)):
        os.utime(entry, ns=(age + 1, age + 1))          # both long unused, "a"'s the oldest
    assert isinstance(tokenizer_of("a"), SpawnedTokenizer)   # used now
    tokenizer_of("c")                                     # a third entry: "b"'s goes
    assert len(list(cache.iterdir())) == 2
    assert isinstance(tokenizer_of("a"), SpawnedTokenizer)
    assert not isinstance(tokenizer_of("b"), SpawnedTokenizer)


def test_an_unusable_cache_folder_costs_only_the_speed_up(tiny_dirs, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(blocked))
    real, again = opened_twice(tiny_dirs["llama"])
    assert not isinstance(again, SpawnedTokenizer)
    assert torch.equal(tokenize(again, TEXT), tokenize(real, TEXT))
