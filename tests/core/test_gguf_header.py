"""The GGUF metadata read without gguf-py's reader: raw values byte for byte as gguf-py sees them,
and the export's tokenizer check built on them."""
import numpy as np

from studio.core import gguf_header
from studio.core.export.gguf import tokenizer_keys_equal


def write(path, tokens, extra=None):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    if extra:
        writer.add_string(extra, "x")
    writer.add_tensor("w", np.zeros((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_raw_values_are_the_bytes_gguf_py_reads(tmp_path):
    from gguf import GGUFReader

    path = write(tmp_path / "a.gguf", ["<s>", "a", "b", "ab", "é"])
    raw = gguf_header.raw_values(path, "tokenizer.")
    fields = GGUFReader(path).fields
    expected = {k: b"".join(p.tobytes() for p in f.parts[2:])    # parts 0-1: the key itself
                for k, f in fields.items() if k.startswith("tokenizer.")}
    assert set(raw) == set(expected) and len(raw) == 4
    assert all(raw[k] == expected[k] for k in raw)
    assert set(gguf_header.raw_values(path)) == set(fields) - {"GGUF.version",
                                                             "GGUF.tensor_count",
                                                             "GGUF.kv_count"}


def test_tokenizer_check_names_a_changed_or_added_key(tmp_path):
    source = write(tmp_path / "s.gguf", ["<s>", "a", "b", "ab"])
    same = write(tmp_path / "same.gguf", ["<s>", "a", "b", "ab"])
    changed = write(tmp_path / "c.gguf", ["<s>", "a", "b", "ac"])
    added = write(tmp_path / "x.gguf", ["<s>", "a", "b", "ab"], extra="tokenizer.chat_template")
    assert tokenizer_keys_equal(source, same) == (True, "4 tokenizer keys byte-identical to "
                                                        "the source GGUF's")
    equal, detail = tokenizer_keys_equal(source, changed)
    assert not equal and "tokenizer.ggml.tokens" in detail and "merges" not in detail
    equal, detail = tokenizer_keys_equal(source, added)
    assert not equal and "tokenizer.chat_template" in detail
