"""The layer list read from headers alone is the loaded model's inventory: the same names,
blocks, roles, shapes and parameter counts for every tiny family and for a GGUF (llama.cpp's
names mapped back to the model's); in the same order where a block runs q, k, v, o, gate, up,
down (OPT declares k, v, q and Phi-3 o before qkv: their rows come in another order until
the model has loaded)."""
import pytest

from studio.core.header_inventory import gguf_inventory, header_inventory
from studio.core.jobs import run
from studio.core.models import open_model_job

FIELDS = ("name", "block", "role", "kind", "shape", "params", "quantizable", "tied_to")


def rows(layers):
    return [tuple(getattr(info, f) for f in FIELDS) for info in layers]


def test_headers_list_the_loaded_models_layers(family_dirs):
    for arch, folder in family_dirs.items():
        handle = run(open_model_job(folder, "memory"))
        listed, loaded = rows(header_inventory(folder)), rows(handle.layers)
        assert sorted(listed) == sorted(loaded), arch
        assert arch in ("opt", "phi3") or listed == loaded, arch


def test_a_gguf_tensor_table_lists_the_models_layers(tiny_dirs, tmp_path):
    from studio.core.export.base import ExportOptions
    from studio.core.export.gguf import GGUF
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job

    handle = run(open_model_job(tiny_dirs["llama"]))
    variant = run(quantize_job(handle, Plan(QuantSpec(8, 32, True)), None, None, "hdr"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(), None, tmp_path))
    listed = gguf_inventory(written.file)
    assert rows(listed) == rows(handle.layers)
    assert {info.dtype for info in listed} == {"float32"}   # what the studio de-quantizes to


def test_a_missing_model_is_refused_as_opening_would(tmp_path):
    from studio.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        header_inventory(tmp_path / "nothing here")
