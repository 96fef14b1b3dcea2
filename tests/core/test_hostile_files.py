"""Files from strangers: no code runs, no header claim is allocated, every refusal is a
StudioError with a message (CLI exit 2)."""
import json
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.core.errors import ModelLoadError, StudioError
from studio.core.file_checks import gguf_summary, safetensors_header
from studio.core.jobs import run
from studio.core.models import open_model_job
from tests.fuzz.harness import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]


def open_(source):
    return run(open_model_job(source))


def copy_model(tiny_dirs, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(tiny_dirs["llama"], folder)
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


EVIL = "import pathlib\npathlib.Path({!r}).write_text('ran')\nclass EvilConfig: pass\n"


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_and_never_runs(tiny_dirs, tmp_path, where):
    folder = copy_model(tiny_dirs, tmp_path)
    sentinel = tmp_path / "code-ran"
    (folder / "evil.py").write_text(EVIL.format(str(sentinel)))
    (folder / "tokenization_evil.py").write_text(EVIL.format(str(sentinel)))
    auto_map = ({"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
                if where == "config.json" else {"AutoTokenizer": ["tokenization_evil.EvilConfig", None]})
    edit_json(folder / where, auto_map=auto_map)
    with pytest.raises(ModelLoadError, match="own Python code") as info:
        open_(folder)
    assert where in str(info.value)
    assert not sentinel.exists()


def test_pickled_weights_never_run_code(tiny_dirs, tmp_path):
    """A .bin-only folder goes through torch.load(weights_only=True): a pickle that would run
    code is refused."""
    folder = copy_model(tiny_dirs, tmp_path)
    state = {k: v for k, v in open_(folder).model.state_dict().items()}
    for file in folder.glob("*.safetensors"):
        file.unlink()
    sentinel = tmp_path / "pickle-ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (sentinel, "ran"))

    state["evil"] = Evil()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump(state, handle)
    with pytest.raises(ModelLoadError, match="weights in model could not be loaded") as info:
        open_(folder)
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value), info.value
    assert not sentinel.exists()


def write_safetensors(path, header: dict, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_safetensors_claiming_terabytes_is_refused_in_seconds(tmp_path):
    start = time.perf_counter()
    big = write_safetensors(tmp_path / "big.safetensors",
                            {"w": {"dtype": "F32", "shape": [2**20, 2**20],
                                   "data_offsets": [0, 4 * 2**40]}}, b"\0" * 64)
    with pytest.raises(ModelLoadError, match=r"truncated: expected [\d,]+ bytes, found [\d,]+"):
        safetensors_header(big)
    long_header = write_safetensors(tmp_path / "long.safetensors", {}, length=2**50)
    with pytest.raises(ModelLoadError, match="header claims"):
        safetensors_header(long_header)
    assert time.perf_counter() - start < 5


def test_terabyte_safetensors_in_a_model_folder(tiny_dirs, tmp_path):
    folder = copy_model(tiny_dirs, tmp_path)
    write_safetensors(folder / "extra.safetensors",
                      {"w": {"dtype": "F32", "shape": [2**20, 2**20],
                             "data_offsets": [0, 4 * 2**40]}})
    start = time.perf_counter()
    with pytest.raises(StudioError):
        open_(folder)
    assert time.perf_counter() - start < 10


def patch_dim(data: bytes, tensor: str, value: int) -> bytes:
    """Set the first dimension of `tensor` in a GGUF's tensor table."""
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
    return data[:at] + struct.pack("<Q", value) + data[at + 8:]


def test_gguf_claiming_terabytes_is_refused_in_seconds(tmp_path):
    good = write_tiny_gguf(tmp_path / "good.gguf")
    assert gguf_summary(good).param_count > 0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(patch_dim(good.read_bytes(), "token_embd.weight", 2**40))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"truncated: expected [\d,]+ bytes, found [\d,]+"):
        open_(bad)
    counts = tmp_path / "counts.gguf"
    counts.write_bytes(good.read_bytes()[:8] + struct.pack("<QQ", 2**62, 2**62)
                       + good.read_bytes()[24:])
    with pytest.raises(ModelLoadError, match="claims"):
        open_(counts)
    assert time.perf_counter() - start < 5


def test_truncated_gguf_says_so_in_the_users_terms(tmp_path):
    data = write_tiny_gguf(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError) as info:
        open_(cut)
    assert f"truncated: expected {len(data):,} bytes, found {len(data) - 100:,}" in str(info.value)
    assert "reshape" not in str(info.value)


def test_cli_exits_2_with_one_line_on_a_truncated_gguf(tmp_path):
    data = write_tiny_gguf(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:300])
    done = subprocess.run([sys.executable, "-m", "studio", "inspect", str(cut)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "cut.gguf" in last and "Traceback" not in done.stderr


def test_config_claiming_a_huge_model_is_refused_before_building_it(tiny_dirs, tmp_path):
    folder = copy_model(tiny_dirs, tmp_path)
    edit_json(folder / "config.json", vocab_size=10**9)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="memory|does not match the weights"):
        open_(folder)
    edit_json(folder / "config.json", vocab_size=384, num_hidden_layers=10**7)
    with pytest.raises(ModelLoadError, match="layers"):
        open_(folder)
    assert time.perf_counter() - start < 20


def test_config_with_wrong_types(tiny_dirs, tmp_path):
    folder = copy_model(tiny_dirs, tmp_path)
    edit_json(folder / "config.json", architectures=7)
    with pytest.raises(ModelLoadError, match="not a model config"):
        open_(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError):
        open_(folder)


def test_shard_index_cannot_point_outside_the_folder(tiny_dirs, tmp_path):
    folder = copy_model(tiny_dirs, tmp_path)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        open_(folder)


def test_recipe_regex_that_backtracks_forever_is_refused(tmp_path):
    from studio.core.plan import Plan

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"format": "compression-studio-recipe", "version": 1,
                                  "default": None,
                                  "rules": [{"pattern": "(.*a)+$", "regex": True, "spec": None}]}))
    with pytest.raises(StudioError, match="repeats a group"):
        Plan.load(recipe)
    recipe.write_text(json.dumps({"format": "compression-studio-recipe", "version": 1,
                                  "default": {"bits": 4, "method": "gptq",
                                              "options": {"block_size": 0}}}))
    with pytest.raises(StudioError, match="block_size"):
        Plan.load(recipe)


def test_variant_with_a_hostile_tensor_file(tiny_llama, tmp_path):
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job
    from studio.core.variant import load_variant, save_variant

    variant = run(quantize_job(tiny_llama, Plan(default=QuantSpec(bits=4, group_size=32)),
                               None, None, "v"))
    folder = save_variant(variant, tmp_path / "v")
    write_safetensors(folder / "quantized.safetensors",
                      {"x.qweight": {"dtype": "I32", "shape": [2**30, 2**30],
                                     "data_offsets": [0, 4 * 2**60]}})
    with pytest.raises(StudioError, match="truncated"):
        load_variant(folder, tiny_llama)
    meta = json.loads((folder / "variant.json").read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["shape"] = [10**9, 10**9]
    (folder / "variant.json").write_text(json.dumps(meta))
    with pytest.raises(StudioError):
        load_variant(folder, tiny_llama)


def test_json_files_too_large_are_refused_unread(tmp_path, monkeypatch):
    from studio.core import files
    from studio.core.plan import Plan

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1000)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(" " * 2000 + "{}")
    with pytest.raises(StudioError, match="at most"):
        Plan.load(recipe)


def test_a_fifo_named_like_weights_does_not_block(tiny_dirs, tmp_path):
    import os

    folder = copy_model(tiny_dirs, tmp_path)
    os.mkfifo(folder / "extra.safetensors")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not a regular file"):
        open_(folder)
    assert time.perf_counter() - start < 10


def test_an_oversized_tokenizer_is_not_parsed(tiny_dirs, tmp_path, monkeypatch):
    from studio.core import models

    folder = copy_model(tiny_dirs, tmp_path)
    monkeypatch.setattr(models, "MAX_TOKENIZER_BYTES", 1000)
    handle = open_(folder)
    assert handle.tokenizer is None and any("larger than" in n for n in handle.notes)
