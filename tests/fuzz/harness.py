"""Mutation fuzzing of every file the studio reads from strangers.

A valid file of each kind (a tiny GGUF written with the gguf package, safetensors, a model
folder's config.json, a recipe, a sensitivity result, a variant folder's files, a session folder's files) is mutated by a
seeded loop (bit flips, interesting integers written over header words, truncation, inserted
and deleted bytes; JSON kinds also get structure-aware edits: a value replaced by a hostile one,
a key removed, an `auto_map` added) and handed to the studio's loader for that kind. A loader may
return or raise `StudioError`; anything else, or a mutant taking longer than `SLOW_SECONDS`,
is a finding. Reproducible: kind, seed and iteration name a mutant.

Used by tests/core/test_fuzz_files.py (a bounded pass) and benchmarks/fuzz_files.py (longer).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from studio.core.errors import StudioError

SLOW_SECONDS = 10.0
INTERESTING = [0, 1, 2, 7, 8, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
HOSTILE_JSON = [None, True, -1, 0, 2**63, -2**63, 10**30, 1e308, float("nan"), "", "x" * 10_000,
                [], [1, 2], {}, {"a": {"b": None}}, "../../etc/passwd", "model.layers.0",
                [[[[[]]]]], "𝒰\u0000", 3.5]


@dataclass
class Kind:
    """One file kind: where its valid file is, which file(s) to mutate, how to load it."""
    name: str
    files: list[Path]                 # files to mutate (one per mutant, chosen at random)
    load: Callable[[], object]        # reads the (mutated) file(s) in place
    json_like: bool = False
    header_bytes: int = 4096          # binary kinds: most mutations land in the header
    focus: str | None = None          # a JSON key most edits aim at (its values, its siblings)


@dataclass
class Finding:
    kind: str
    iteration: int
    mutation: str
    error: str
    seconds: float

    def __str__(self) -> str:
        return (f"{self.kind}#{self.iteration} [{self.mutation}] {self.error} "
                f"({self.seconds:.1f} s)")


@dataclass
class Stats:
    kind: str
    iterations: int = 0
    accepted: int = 0                 # loaded without complaint
    refused: int = 0                  # StudioError
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    slowest: float = 0.0
    messages: dict[str, int] = field(default_factory=dict)  # first words of refusals


# --- valid seeds ---------------------------------------------------------------------------------

def write_tiny_gguf(path: Path) -> Path:
    """A small llama GGUF with metadata, a string-array vocabulary and F32 / F16 / Q8_0 tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(40)])
    writer.add_token_scores([float(i) for i in range(40)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((40, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((8, 64), dtype=np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_kinds(root: Path, model_folder: Path, handle) -> dict[str, Kind]:
    """Valid files of every kind under `root` (copies: mutants are written in place).
    `model_folder` is a tiny model folder, `handle` that model opened (for variants)."""
    from safetensors.torch import save_file

    from studio.core.file_checks import gguf_summary, safetensors_header
    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from studio.core.plan import Plan, QuantSpec, Rule
    from studio.core.quantize import quantize_job
    from studio.core.sensitivity import sensitivity_job
    from studio.core.text import text_windows
    from studio.core.variant import load_variant, save_variant

    root.mkdir(parents=True, exist_ok=True)
    gguf_file = write_tiny_gguf(root / "tiny.gguf")

    def load_gguf():
        gguf_summary(gguf_file)
        _gguf_reader_agrees(gguf_file)

    st_file = root / "tensors.safetensors"
    import torch
    save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b": torch.ones(5, dtype=torch.float16), "c": torch.zeros(2, 2, dtype=torch.int32)},
              str(st_file), metadata={"format": "pt"})

    def load_safetensors():
        from safetensors.torch import load_file
        safetensors_header(st_file)
        try:
            load_file(str(st_file))
        except Exception as exc:
            raise AssertionError(f"the header check passed but safetensors refused: {exc}")

    model_copy = root / "model"
    shutil.copytree(model_folder, model_copy)

    plan = Plan(default=QuantSpec(bits=4, group_size=32),
                rules=(Rule("lm_head", None), Rule(r".*down_proj", QuantSpec(bits=8), regex=True)),
                architecture=handle.architecture)
    recipe = root / "recipe.json"
    plan.save(recipe)

    windows = text_windows(handle.tokenizer, None, 16, 2, seed=0)[0]
    result = run(sensitivity_job(handle, windows, bits=(2, 4), group_sizes=(32,), kl_windows=0,
                                 proxy_windows=2, proxy_tokens=32))
    sens = root / "sensitivity.json"
    result.save(sens)

    variant = run(quantize_job(handle, Plan(default=QuantSpec(bits=4, group_size=32)), None,
                               None, "fuzz"))
    vfolder = save_variant(variant, root / "variant")
    # A tied lm_head / embedding quantized once: the embedding holds the head's codes
    # ("codes_of" in variant.json), an alias a damaged or hostile file can point anywhere.
    tied = run(quantize_job(handle, Plan(default=QuantSpec(bits=4, group_size=32),
                                         rules=(Rule("lm_head", QuantSpec(8, -1, True)),)),
                            None, None, "fuzz tied"))
    assert tied.shared, "the fuzz model's head is not tied"
    tfolder = save_variant(tied, root / "variant-tied")

    from studio.core.session import Session
    from studio.core.session_file import save_session
    session_folder = save_session(
        Session(handle=handle, plan=plan, results={"sensitivity": result, "exports": [{"a": 1}]},
                runs=[{"kind": "eval", "ppl": 3.5}]), root / "fuzz.session",
        {"tab": "Plan"}).path

    return {
        "gguf": Kind("gguf", [gguf_file], load_gguf, header_bytes=1024),
        "safetensors": Kind("safetensors", [st_file], load_safetensors, header_bytes=400),
        "config": Kind("config", [model_copy / "config.json"],
                       lambda: run(open_model_job(model_copy)), json_like=True),
        "recipe": Kind("recipe", [recipe], lambda: Plan.load(recipe), json_like=True),
        "sensitivity": Kind("sensitivity", [sens], lambda: _use_sensitivity(sens, handle),
                            json_like=True),
        "variant": Kind("variant", [vfolder / n for n in ("variant.json", "recipe.json",
                                                          "quantized.safetensors",
                                                          "floats.safetensors")],
                        lambda: load_variant(vfolder, handle), json_like=True, header_bytes=2048),
        "variant_tied": Kind("variant_tied", [tfolder / "variant.json"],
                             lambda: _use_variant(tfolder, handle), json_like=True,
                             focus="codes_of"),
        "session": Kind("session", [session_folder / "session.json",
                                    session_folder / "arrays.safetensors"],
                        lambda: _use_session(session_folder, handle), json_like=True,
                        header_bytes=2048),
    }


def _use_variant(folder: Path, handle) -> None:
    """Load, then run what a loaded variant is used for: a forward pass (both ends of a tied
    pair read the codes) and its size."""
    import torch

    from studio.core.variant import load_variant

    variant = load_variant(folder, handle)
    with torch.no_grad():
        logits = variant.model(torch.arange(1, 9).reshape(1, 8)).logits
    if not torch.isfinite(logits).all():
        raise AssertionError("a loaded variant gives non-finite logits")
    variant.size_breakdown


def _use_sensitivity(path: Path, handle) -> None:
    """Load, then use as the Plan tab does: the allocator's table and an allocation."""
    from studio.core.allocate import allocate, loss_table
    from studio.core.sensitivity import SensitivityResult

    result = SensitivityResult.load(path)
    result.loss("auto")
    table = loss_table(result, handle)
    allocate(table, budget_bpw=4.5)


def _use_session(path: Path, handle) -> None:
    """Restore on the already-open model (opening it again each time would only cost time)."""
    from unittest import mock

    from studio.core.jobs import run
    from studio.core.session_file import open_session_job

    def opened(source):
        return handle
        yield

    with mock.patch("studio.core.models.open_model_job", opened):
        restored = run(open_session_job(path))
    result = restored.session.results.get("sensitivity")
    if result is not None and hasattr(result, "loss"):
        result.loss("auto")


def _gguf_reader_agrees(path: Path) -> None:
    """What the check accepts, gguf's own reader (transformers' GGUF loader) must read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        for tensor in reader.tensors:
            np.asarray(tensor.data[:1])
    except Exception as exc:
        raise AssertionError(f"the GGUF check passed but gguf's reader refused: "
                             f"{type(exc).__name__}: {exc}")


# --- mutations ---------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random, header: int) -> tuple[bytes, str]:
    buf = bytearray(data)
    if not buf:
        return bytes([rng.randrange(256)]), "one byte"
    pos = lambda: rng.randrange(min(len(buf), header)) if rng.random() < 0.85 else rng.randrange(len(buf))  # noqa: E731
    op = rng.choice(["flip", "byte", "word", "word", "truncate", "insert", "delete", "copy"])
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            p = pos()
            buf[p] ^= 1 << rng.randrange(8)
        return bytes(buf), "bit flips"
    if op == "byte":
        p = pos()
        buf[p] = rng.choice([0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("9"), rng.randrange(256)])
        return bytes(buf), f"byte at {p}"
    if op == "word":
        p = pos()
        value = rng.choice(INTERESTING)
        fmt = rng.choice(["<Q", "<I"]) if value < 2**32 else "<Q"
        word = struct.pack(fmt, value)
        buf[p:p + len(word)] = word
        return bytes(buf[:len(data)] if len(buf) > len(data) else buf), f"{fmt} {value} at {p}"
    if op == "truncate":
        cut = rng.randrange(len(buf))
        return bytes(buf[:cut]), f"truncated to {cut}"
    if op == "insert":
        p = pos()
        chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(buf[:p] + chunk + buf[p:]), f"{len(chunk)} bytes inserted at {p}"
    if op == "delete":
        p = pos()
        n = rng.randint(1, 16)
        return bytes(buf[:p] + buf[p + n:]), f"{n} bytes deleted at {p}"
    a, n = pos(), rng.randint(4, 64)
    b = pos()
    buf[b:b + n] = buf[a:a + n]
    return bytes(buf), f"{n} bytes copied {a}->{b}"


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    try:
        doc = json.loads(data)
    except ValueError:
        return mutate_bytes(data, rng, len(data))
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc, ()))
    path = rng.choice(paths) if paths else ()
    op = rng.choice(["replace", "replace", "replace", "delete", "auto_map", "grow"])
    if op == "auto_map" and isinstance(doc, dict):
        doc["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                           "AutoModelForCausalLM": "evil.EvilModel"}
        return _dump(doc), "auto_map added"
    if not path:
        return _dump(rng.choice(HOSTILE_JSON)), "document replaced"
    parent = _at(doc, path[:-1])
    if op == "delete":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
        return _dump(doc), f"deleted {_label(path)}"
    if op == "grow":
        value = _at(doc, path)
        if isinstance(value, list) and value:
            parent[path[-1]] = value * rng.choice([2, 100])
            return _dump(doc), f"list {_label(path)} repeated"
    parent[path[-1]] = rng.choice(HOSTILE_JSON)
    return _dump(doc), f"{_label(path)} = {str(parent[path[-1]])[:40]!r}"


def mutate_focus(data: bytes, rng: random.Random, key: str) -> tuple[bytes, str]:
    """Edits aimed at `key` (e.g. variant.json's "codes_of", a layer holding another's codes):
    its value replaced by a sibling's name (itself, a layer of another shape, one that is an
    alias too), a hostile value, or removed; or the key added to a sibling (an alias chain, a
    leader aliased back)."""
    doc = json.loads(data)
    holders = [p for p in _paths(doc, ()) if p[-1] == key]
    if not holders:
        return mutate_json(data, rng)
    path = rng.choice(holders)
    owner, table = path[:-1], _at(doc, path[:-2])     # the entry holding it, and its siblings
    names = list(table) if isinstance(table, dict) else []
    op = rng.choice(["name", "name", "hostile", "delete", "add"])
    if op == "delete":
        del _at(doc, owner)[key]
        return _dump(doc), f"deleted {_label(path)}"
    if op == "add" and names:
        other = rng.choice(names)
        if isinstance(table[other], dict):
            table[other][key] = rng.choice(names + [path[-2]])
            return _dump(doc), f"{other}.{key} = {table[other][key]!r}"
    value = rng.choice(names) if op == "name" and names else rng.choice(HOSTILE_JSON)
    _at(doc, owner)[key] = value
    return _dump(doc), f"{_label(path)} = {str(value)[:40]!r}"


def _paths(node, prefix):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node[:50]):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


def _at(node, path):
    for key in path:
        node = node[key]
    return node


def _label(path) -> str:
    return ".".join(str(p) for p in path)


def _dump(doc) -> bytes:
    return json.dumps(doc).encode()


# --- the loop ------------------------------------------------------------------------------------

def fuzz_kind(kind: Kind, seed: int = 0, iterations: int | None = None,
              seconds: float | None = None) -> Stats:
    """Mutate and load until `iterations` or `seconds` run out (whichever is given first)."""
    rng = random.Random(f"{kind.name}:{seed}")
    originals = {f: f.read_bytes() for f in kind.files}
    stats = Stats(kind.name)
    started = time.perf_counter()
    try:
        while True:
            if iterations is not None and stats.iterations >= iterations:
                break
            if seconds is not None and time.perf_counter() - started >= seconds:
                break
            target = rng.choice(kind.files)
            data = originals[target]
            if kind.focus and target.suffix == ".json" and rng.random() < 0.6:
                mutant, how = mutate_focus(data, rng, kind.focus)
            elif kind.json_like and target.suffix == ".json" and rng.random() < 0.7:
                mutant, how = mutate_json(data, rng)
            else:
                mutant, how = mutate_bytes(data, rng, kind.header_bytes)
            target.write_bytes(mutant)
            how = f"{target.name}: {how}"
            t0 = time.perf_counter()
            error = None
            try:
                kind.load()
                stats.accepted += 1
            except StudioError as exc:
                stats.refused += 1
                words = " ".join(str(exc).split()[:3])
                stats.messages[words] = stats.messages.get(words, 0) + 1
            except Exception as exc:  # noqa: BLE001 - anything else is what we hunt
                error = f"{type(exc).__name__}: {exc}"[:300]
                tb = traceback.extract_tb(exc.__traceback__)
                if tb:
                    error += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
            spent = time.perf_counter() - t0
            stats.slowest = max(stats.slowest, spent)
            if error is None and spent > SLOW_SECONDS:
                error = f"took {spent:.1f} s"
            if error is not None:
                stats.findings.append(Finding(kind.name, stats.iterations, how, error, spent))
            target.write_bytes(data)
            stats.iterations += 1
    finally:
        for f, data in originals.items():
            f.write_bytes(data)
        stats.seconds = time.perf_counter() - started
    return stats
