"""GGUF for llama.cpp, Ollama and LM Studio, written with the gguf package.

Each quantized layer goes into the GGUF type that holds its codes exactly (4-bit symmetric ->
Q4_0; 4-bit asymmetric -> Q5_0, or Q4_1 if the user prefers it smaller; 2/3-bit -> Q4_0; 5-bit
symmetric -> Q5_0; other widths up to 8-bit symmetric -> Q8_0), the codes packed by hand
(gguf_pack), never re-rounded from de-quantized floats. Layers no type holds (8-bit
asymmetric, rows that are not whole 32-weight blocks) are refused or take the nearest type, as
the user chooses, with its measured error. Everything else is F32 (1-D) or the chosen float type.

The source decides the metadata. A GGUF source (the demo) is copied: every key, the tokenizer
byte for byte, its tensor names and order; only general.file_type changes. A Hugging Face
folder (Llama, Qwen2, Gemma 2) gets the architecture keys from its config and the tokenizer
keys from its byte-level BPE tokenizer, with llama.cpp's pre-tokenizer name (gguf_meta).

The export is re-opened with transformers' GGUF loader (in a child process, cancellable) and
with gguf's reader for the tokenizer check.
"""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from studio.core import gguf_header
from studio.core.errors import StudioError

from studio.core.export import gguf_meta, gguf_pack, gguf_split, gguf_vocab
from studio.core.quant.formats import export_problems
from studio.core.export.base import ExportFormat, ExportOptions, Preflight, Reloaded, Written
from studio.core.export.gguf_tensors import (Entry, choose, float_bytes, float_type,
                                             layer_target, map_names, ordered_entries,
                                             refusals)
from studio.core.export.gguf_types import TYPES
from studio.core.export.shards import describe_size
from studio.core.export.tensors import float_tensors
from studio.core.files import safe_name
from studio.core.jobs import Job, Progress
from studio.core.streaming import StoredParameter

FLOAT_ROWS_ELEMENTS = 1 << 22   # a float tensor is converted this many elements at a time
# llama.cpp's process beyond the file it maps: Python, the library, its compute and logits
# buffers, and buffers that grow with the output matrix (vocabulary x hidden). Fitted on three
# runs (`bench_large.py guard`): the demo split 354 MiB peak with a 125 MiB file, the 3B's
# 2-block cut 1372 with 887, the 3B 3117 with 2600 (the one constant of 512 before put the
# demo 80% over)
LLAMA_CPP_RUNTIME = 208 * 2 ** 20
LLAMA_CPP_PER_OUTPUT_WEIGHT = 0.74   # bytes per vocabulary x hidden element
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0",
              "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}


@dataclass(frozen=True)
class Source:
    kind: str               # "gguf" (its metadata is copied) or "folder"
    path: Path
    arch: str | None        # GGUF architecture; None when there is none the studio can write
    problem: str | None = None


def source_of(handle) -> Source:
    from studio.core.models import resolve_source

    kind, path = resolve_source(handle.source)
    if kind == "gguf":
        field = source_reader(path).get_field("general.architecture")
        arch = field.contents() if field is not None else None
        if arch not in gguf_meta.GGUF_ARCHS:
            return Source(kind, path, None, f"{path.name} is a '{arch}' GGUF; the studio "
                          f"re-writes GGUF files of {', '.join(gguf_meta.GGUF_ARCHS)} only.")
        return Source(kind, path, arch)
    arch = gguf_meta.HF_ARCHS.get(handle.model_type)
    if arch is None:
        return Source(kind, path, None, (
            f"A {handle.model_type} model has no GGUF form the studio can write and verify: "
            f"GGUF export covers {', '.join(gguf_meta.HF_ARCHS)} folders (transformers' GGUF "
            f"loader and llama.cpp both read them) and GGUF files of "
            f"{', '.join(gguf_meta.GGUF_ARCHS)}."))
    return Source(kind, path, arch)


# gguf's reader, per vocabulary entry of the header it parses (the demo: 159 MiB / 49,152)
READER_BYTES_PER_TOKEN = 3390


@functools.lru_cache(maxsize=1)
def _reader(path: str, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def source_reader(path: Path):
    """The source GGUF's reader, parsed once per file version: gguf's reader turns every key
    into numpy views, the whole vocabulary included (~5 s for the demo)."""
    return _reader(str(path), path.stat().st_mtime_ns)


def file_name(variant_name: str) -> str:
    return f"{safe_name(variant_name, default='model')}.gguf"


class GgufFormat(ExportFormat):
    name = "gguf"
    title = "GGUF for llama.cpp, Ollama and LM Studio"
    description = ("A .gguf file: each quantized layer in the GGUF type that holds its codes "
                   "exactly (Q4_0, Q4_1, Q5_0, Q8_0), other tensors in F16/BF16/F32, the "
                   "tokenizer and metadata carried over. Runs in llama.cpp, Ollama, LM Studio.")
    consumer = "transformers' GGUF loader (gguf-py)"
    splits_as = ("NAME-00001-of-0000N.gguf, ..., as llama.cpp's gguf-split cuts a GGUF "
                 "(llama.cpp and LM Studio open the first; Ollama takes one file only)")

    # --- before any work ---------------------------------------------------------------------

    def preflight(self, variant, handle, options: ExportOptions) -> Preflight:
        refused = export_problems(variant.qtensors, self.name)  # codebook / vector codes
        if refused:
            return Preflight([], problems=refused)
        source = source_of(handle)
        if source.problem:
            return Preflight([], problems=[source.problem])
        problems, notes = [], []
        if getattr(handle, "streamed", False):
            from studio.core.export import llama_cpp
            from studio.core.export.streamed_reload import needs_llama_cpp
            if not llama_cpp.available():
                problems.append(needs_llama_cpp())
            notes.append("Verified the streamed way: each tensor de-quantized by gguf-py "
                         "against the variant's, one at a time, and the logits from llama.cpp "
                         "running the file.")
        if source.kind == "folder":
            problems += gguf_meta.config_problems(variant.model.config, source.arch)
            notes += gguf_meta.config_notes(variant.model.config, source.arch)
            if gguf_meta.rope_freqs_needed(variant.model.config, source.arch):
                problems += rope_freqs_problems(notes)
            why = gguf_vocab.tokenizer_problem(handle.tokenizer, source.path)
            if why:
                problems.append(why)
            else:
                notes.append(vocabulary_note(handle.tokenizer, source.path))
                rows = variant.model.get_input_embeddings().num_embeddings
                extra = gguf_vocab.beyond_vocab(handle.tokenizer, rows)
                if extra:
                    notes.append(f"The tokenizer has {len(extra)} token(s) beyond the model's "
                                 f"{rows} embedding rows ({', '.join(extra[:4])}); the model "
                                 f"cannot take them, so the GGUF's vocabulary leaves them out.")
        mapped, unmapped = map_names(variant, handle, source.arch)
        if unmapped:
            problems.append(f"These tensors have no name of their own in a {source.arch} "
                            f"GGUF: {', '.join(unmapped[:6])}.")
        if source.kind == "gguf":   # only an untied output layer may be new
            known = {t.name for t in source_reader(source.path).tensors}
            new = sorted(set(mapped) - known - {"output.weight"})
            if new:
                problems.append(f"The variant's tensors map to names {source.path.name} does "
                                f"not have ({', '.join(new[:6])}); the studio cannot tell "
                                f"which of its tensors they replace.")
        if problems:
            return Preflight([], problems=problems, notes=notes)
        choices = {name: choose(qt, options) for name, qt in variant.qtensors.items()}
        targets = [layer_target(name, qt, choices[name])
                   for name, qt in variant.qtensors.items()]
        for name, qt in variant.qtensors.items():
            if choices[name].how != "float" and not gguf_pack.scales_in_fp16_range(qt):
                problems.append(f"{name} has scales beyond fp16's range (65504), which GGUF "
                                f"blocks store in fp16.")
        if options.inexact == "refuse":
            problems += refusals(targets, choices)
        preflight = Preflight(targets)
        if not problems and self.splits(variant, options, preflight):
            from studio.core.export import llama_cpp
            size = tensor_bytes(variant, options, preflight)
            if not llama_cpp.available():
                problems.append(
                    f"The GGUF's tensors take {describe_size_mb(size)}, over the shard size "
                    f"({describe_size(options.shard_size)}), so it would be split into several "
                    f"files, which only llama.cpp reads (transformers' GGUF loader reads one "
                    f"file): install the binding to verify it (pip install "
                    f"'compression-studio[llama-cpp]'), or raise the shard size above "
                    f"{describe_size_mb(size)}.")
            else:
                notes.append(f"The GGUF's tensors take {describe_size_mb(size)}, over the shard "
                             f"size ({describe_size(options.shard_size)}): it will be split into "
                             f"several files as llama.cpp's gguf-split cuts them, verified "
                             f"tensor by tensor and by llama.cpp running them. Ollama cannot "
                             f"import a split GGUF; a larger shard size keeps one file.")
        if any(c.how == "codes" and not gguf_pack.scales_are_fp16(variant.qtensors[n])
               for n, c in choices.items()):
            notes.append("Some layers' scales are not fp16 values, and GGUF stores each "
                         "block's scale in fp16: their measured error is listed. The "
                         "GGUF-native plan option quantizes with fp16 scales and avoids it.")
        for follower, leader in variant.shared.items():
            notes.append(f"{leader} and {follower} are one tied matrix: stored once, as "
                         f"token_embd.weight in {choices[leader].stored_as}; with no output.weight "
                         f"llama.cpp and transformers use it as the output head too.")
        if variant.act_bits:
            notes.append("SmoothQuant's activation quantization is not part of a GGUF: the file "
                         "holds the smoothed, quantized weights; llama.cpp quantizes "
                         "activations its own way.")
        if source.kind == "gguf":
            notes.append(f"Metadata and tokenizer copied from {source.path.name}; tensors the "
                         f"variant did not quantize are re-written in {options.dtype.upper()} "
                         f"(1-D ones in F32).")
        return Preflight(targets, problems=problems, notes=notes)

    # --- writing -----------------------------------------------------------------------------

    def runtime_bytes(self, variant, handle, options: ExportOptions, preflight: Preflight) -> int:
        """A streamed variant's GGUF, and a split one, is verified by llama.cpp running it in a
        process of its own, which maps the file: a forward touches every page, so the whole
        file counts in that process beside its own runtime (measured on the 3B: 3117 MiB with
        a 2.6 GiB file). Sized from the layers' GGUF types and the floats' shapes, before
        writing."""
        if not (getattr(handle, "streamed", False) or self.splits(variant, options, preflight)):
            return 0    # (verified through transformers' loader: `memory.guard_convert`)
        return tensor_bytes(variant, options, preflight) + llama_cpp_runtime(variant.model)

    def studio_bytes(self, variant, handle) -> dict[str, int]:
        """gguf's reader turns every key of a header into NumPy views, the vocabulary's
        strings and merges included: the source GGUF's (kept for the export) and the written
        file's (its tokenizer keys checked). Measured on the demo: 159 MiB for its 49,152-token
        header, and the guard under-counted its GGUF exports by 11% (one file) and 19%
        (split) without them. A streamed variant's estimate is the largest of its phases,
        above these (the 3B cut within 6% without them): not counted there."""
        if getattr(handle, "streamed", False):
            return {}
        from studio.core.memory import model_shape

        headers = 2 if source_of(handle).kind == "gguf" else 1
        return {"GGUF headers parsed": headers * READER_BYTES_PER_TOKEN
                * model_shape(variant.model)["vocab"]}

    def splits(self, variant, options: ExportOptions, preflight: Preflight) -> bool:
        """Whether the file will be over the shard size, so written in several files."""
        return bool(preflight.targets) and \
            tensor_bytes(variant, options, preflight) > options.shard_size

    def write_job(self, variant, handle, options: ExportOptions, preflight: Preflight,
                  folder: Path) -> Job[Written]:
        import gguf

        source = source_of(handle)
        path = folder / file_name(variant.name)
        reader = source_reader(source.path) if source.kind == "gguf" else None
        mapped, _ = map_names(variant, handle, source.arch)
        entries = ordered_entries(mapped, reader)
        choices = {name: choose(qt, options) for name, qt in variant.qtensors.items()}
        floats = float_tensors(variant, lazy=True)   # read one at a time as they are written
        file_type = getattr(gguf.LlamaFileType, FILE_TYPES[dominant_type(variant, choices)])

        yield Progress(0, len(entries) + 1, "Writing the metadata")
        writer = gguf.GGUFWriter(path, arch=source.arch)
        if reader is not None:
            raw = copy_metadata(reader, writer, file_type)
        else:
            raw = {}
            write_folder_metadata(writer, variant, handle, source, file_type)
            if gguf_meta.rope_freqs_needed(variant.model.config, source.arch):
                freqs = gguf_meta.rope_freqs(variant.model, variant.model.config)
                raw[ROPE_FREQS] = _RawTensor(freqs, gguf.GGMLQuantizationType.F32,
                                             gguf.GGUFEndian.LITTLE)
                entries.insert(0, Entry(ROPE_FREQS, None))   # where llama.cpp puts it
        layer_bytes = {}
        infos = [tensor_info(entry, variant, choices, floats, raw, options)
                 for entry in entries]
        if sum(info[2] for info in infos) > options.shard_size:
            writer.split_max_size = options.shard_size   # gguf-split's files (gguf_split)
        for entry, (shape, dtype, nbytes, kind) in zip(entries, infos):
            writer.add_tensor_info(entry.name, shape, dtype, nbytes, raw_dtype=kind)
            if entry.layer is not None:
                layer_bytes[entry.layer] = nbytes
        paths = writer.format_shard_names(path)
        notes = [gguf_split.note(paths)] if len(paths) > 1 else []
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, entry in enumerate(entries):
                if i % 8 == 0:
                    yield Progress(i + 1, len(entries) + 1, f"Writing {entry.name}")
                if entry.key is None:
                    writer.write_tensor_data(raw[entry.name].data,
                                             tensor_endianess=raw[entry.name].endianess)
                else:
                    writer.write_tensor_data(tensor_data(entry, variant, choices, floats,
                                                         options))
        finally:
            writer.close()
        yield Progress(len(entries) + 1, len(entries) + 1,
                       f"Wrote {paths[0].name}" + (f" and {len(paths) - 1} more file(s)"
                                                   if len(paths) > 1 else ""))
        return Written(file=paths[0], layer_bytes=layer_bytes, entries=entries, notes=notes,
                       shared=dict(variant.shared))

    # --- re-opening --------------------------------------------------------------------------

    def reload_job(self, written: Written, handle) -> Job[Reloaded]:

        from studio.core.gguf_convert import convert_job
        from studio.core.models import load_model, load_tokenizer, read_config

        if getattr(handle, "streamed", False) or len(gguf_split.files(written.file)) > 1:
            # re-opened whole it would be a float32 model, and transformers' GGUF loader reads
            # one file of a split GGUF: read a tensor at a time instead (from each file), the
            # logits from llama.cpp (streamed_reload)
            from studio.core.export.streamed_reload import gguf_job
            reloaded = yield from gguf_job(written.file, written.entries, written.shared)
            reloaded.tokenizer_equal, reloaded.tokenizer_detail = tokenizer_check(
                written.file, handle, None)
            return reloaded
        yield Progress(0, 3, "Re-opening the GGUF with transformers' GGUF loader")
        # (a loaded model may still map its files: where that blocks deleting them, the
        # temporary folder is left for the system to clean rather than failing the export)
        with tempfile.TemporaryDirectory(prefix="studio-gguf-reload-",
                                         ignore_cleanup_errors=True) as tmp:
            folder = Path(tmp) / "model"
            yield from convert_job(written.file, folder)
            yield Progress(2, 3, "Loading the de-quantized model")
            model = load_model(folder, read_config(folder))
            reloaded_tokenizer = load_tokenizer(folder)[0]
        yield Progress(3, 3, "Comparing the tokenizer")
        source = source_of(handle)
        equal, detail = tokenizer_check(written.file, handle, reloaded_tokenizer)
        reloaded = Reloaded(model=model, tokenizer_equal=equal, tokenizer_detail=detail)
        from studio.core.export import llama_cpp
        if source.kind == "folder" and gguf_meta.rope_freqs_needed(handle.model.config,
                                                                   source.arch):
            # transformers' loader drops rope_freqs: the logits come from llama.cpp itself
            reloaded.logits = functools.partial(llama_cpp.logits, written.file)
            reloaded.logits_by = "llama.cpp"
        elif llama_cpp.available():
            # llama.cpp has checks of its own that a file can pass transformers' loader and
            # still fail (and abort on): run it there once, so such a file is never handed out
            yield Progress(3, 3, "Running the file in llama.cpp")
            try:
                llama_cpp.logits(written.file, torch.zeros(1, 8, dtype=torch.long))
            except StudioError as exc:
                raise StudioError(f"The written GGUF does not run in llama.cpp, so nothing was "
                                  f"written: {exc}") from None
            written.notes.append("llama.cpp (cyllama) loads and runs the written file.")
        return reloaded

    def usage(self, file: str) -> str:
        one, ollama = file, "Ollama:     put"
        if gguf_split.SPLIT_NAME.match(file):   # Ollama imports one file (ollama#5245)
            one = f"{gguf_split.SPLIT_NAME.match(file)['prefix']}.gguf"
            ollama = (f"Ollama:     merge the files into one:  llama-gguf-split --merge {file} "
                      f"{one}\n            then put")
        return (f"llama.cpp:  llama-cli -m {file}\n"
                f"{ollama} the line  FROM ./{one}  in a file named Modelfile, then\n"
                f"            ollama create my-model -f Modelfile && ollama run my-model\n"
                f"LM Studio:  lms import {file}")


GGUF = GgufFormat()


def llama_cpp_runtime(model) -> int:
    """llama.cpp's own memory beside the file it maps (`LLAMA_CPP_RUNTIME`)."""
    embeddings = model.get_input_embeddings()
    rows, width = embeddings.weight.shape
    return LLAMA_CPP_RUNTIME + int(LLAMA_CPP_PER_OUTPUT_WEIGHT * rows * width)


def describe_size_mb(size: int) -> str:
    return f"{size / 10 ** 6:,.1f} MB"


def tensor_bytes(variant, options: ExportOptions, preflight: Preflight) -> int:
    """The bytes of the file's tensors, from the layers' GGUF types and the floats' shapes
    (no code read): what the writer will write, known before writing."""
    import math

    import gguf

    from studio.core.export.tensors import float_state

    types = {t.name: t.stored_as for t in preflight.targets}
    total = 0
    for name, qt in variant.unique_qtensors.items():   # shapes only: no codes read
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[name]]]
        total += math.prod(qt.shape) // block * size
    float_size = {"f16": 2, "bf16": 2, "f32": 4}[options.dtype]
    for value in float_state(variant).values():
        total += value.numel() * (4 if value.dim() < 2 else float_size)
    return total


# --- helpers ---------------------------------------------------------------------------------

def tokenizer_check(file: Path, handle, reloaded_tokenizer) -> tuple[bool | None, str]:
    """The written file's tokenizer keys against the source's; with the tokenizer a loader
    built from the file, also that both encode alike."""
    from gguf import GGUFReader

    source = source_of(handle)
    if source.kind == "gguf":
        equal, detail = tokenizer_keys_equal(source.path, file)
    else:
        equal, detail = gguf_vocab.tokenizer_equal(GGUFReader(file), handle.tokenizer,
                                                   source.path)
    if equal and handle.tokenizer is not None and reloaded_tokenizer is not None:
        equal, how = gguf_vocab.encodes_alike(reloaded_tokenizer, handle.tokenizer)
        detail = f"{detail}; {how}"
    return equal, detail


def vocabulary_note(tokenizer, folder: Path) -> str:
    if gguf_vocab.vocabulary_kind(tokenizer, folder) == "spm":
        return (f"SentencePiece vocabulary: pieces, scores and types from "
                f"{gguf_vocab.SPM_FILE}, added tokens from the tokenizer (llama.cpp's "
                f"converter does the same).")
    name, how = gguf_vocab.pre_tokenizer(tokenizer)
    if name is None:
        return ("The tokenizer's pre-tokenizer is not one llama.cpp names (no known checksum, "
                "no known split): tokenizer.ggml.pre will be 'default', so llama.cpp may split "
                "text differently from transformers.")
    return f"tokenizer.ggml.pre will be '{name}' ({how})."


ROPE_FREQS = "rope_freqs.weight"


def rope_freqs_problems(notes: list[str]) -> list[str]:
    """A Llama 3.1-style scaled rope is written as rope_freqs, which only llama.cpp reads: the
    file's logits can only be checked by running it there."""
    from studio.core.export import llama_cpp

    what = ("This model scales its rotary frequencies Llama 3.1-style; the GGUF carries that "
            "as rope_freqs, which llama.cpp reads and transformers' GGUF loader does not")
    if not llama_cpp.available():
        return [f"{what}, so its logits can only be verified in llama.cpp itself: install the "
                f"binding with  pip install 'compression-studio[llama-cpp]'."]
    notes.append(f"{what}: its weights are verified through that loader, its logits through "
                 f"llama.cpp (cyllama).")
    return []


def dominant_type(variant, choices) -> str:
    """The type holding most quantized weights: the file's general.file_type."""
    weights: dict[str, int] = {}
    for name, choice in choices.items():
        count = variant.qtensors[name].numel()
        weights[choice.stored_as] = weights.get(choice.stored_as, 0) + count
    return max(weights, key=weights.get) if weights else "F16"


def copy_metadata(reader, writer, file_type) -> dict:
    """Every key of the source GGUF but general.file_type (gguf-py's gguf_new_metadata.py
    pattern); returns the source's tensors by name, for those copied as they are."""
    from gguf import GGUFValueType

    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue   # written by the writer itself
        if field.name == "general.file_type":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(file_type)
    if reader.get_field("general.quantization_version") is None:
        import gguf
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return {t.name: _RawTensor(t.data, t.tensor_type, reader.endianess) for t in reader.tensors}


@dataclass
class _RawTensor:
    data: np.ndarray
    tensor_type: object
    endianess: object


def write_folder_metadata(writer, variant, handle, source: Source, file_type) -> None:
    import gguf

    config = variant.model.config
    vocab_size = variant.model.get_input_embeddings().num_embeddings
    writer.add_type("model")
    writer.add_name(variant.name)
    gguf_meta.write_arch_keys(writer, config, source.arch, vocab_size)
    gguf_vocab.tokenizer_keys(handle.tokenizer, source.path, vocab_size,
                              source.arch).write(writer)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_info(entry: Entry, variant, choices, floats, raw, options: ExportOptions):
    """(shape, numpy dtype, bytes, GGML type or None) for GGUFWriter.add_tensor_info, known
    before any tensor is made (they are made one at a time while writing)."""
    from gguf import GGMLQuantizationType

    if entry.key is None:
        t = raw[entry.name]
        return t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type
    if entry.layer is not None:
        qt, choice = variant.qtensors[entry.layer], choices[entry.layer]
        out, cols = qt.shape
        if choice.how != "float":
            row = cols // 32 * TYPES[choice.stored_as].block_bytes
            return ((out, row), np.dtype(np.uint8), out * row,
                    GGMLQuantizationType[choice.stored_as])
        kind, shape = choice.stored_as, (out, cols)
    else:
        value = floats[entry.key]
        kind, shape = float_type(value, options), tuple(value.shape)
    count = int(np.prod(shape))
    if kind == "BF16":
        return ((*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), count * 2,
                GGMLQuantizationType.BF16)
    dtype = np.dtype(np.float16 if kind == "F16" else np.float32)
    return shape, dtype, count * dtype.itemsize, None


def tensor_data(entry: Entry, variant, choices, floats, options: ExportOptions) -> np.ndarray:
    """The bytes of one tensor, as `tensor_info` described them."""
    order = None
    if entry.layer is not None:
        qt, choice = variant.qtensors[entry.layer], choices[entry.layer]
        if entry.heads:
            order = gguf_pack.llama_row_order(qt.shape[0], entry.heads)
        if choice.how == "codes":
            return gguf_pack.pack(qt, TYPES[choice.stored_as], order)
        w = qt.dequantize()
        w = w if order is None else w[torch.from_numpy(order)]
        if choice.how == "q8_0":
            return gguf_pack.requantize_q8_0(w)
        return float_bytes(w, choice.stored_as)
    value = floats[entry.key]
    # a streamed tensor read as stored (an embedding of 128256 x 3072: 0.75 GiB in bf16, not
    # 1.5 in float32), then converted a block of rows at a time into the file's type
    value = (value.read(value.dtype) if isinstance(value, StoredParameter) else value).detach()
    if entry.heads:
        value = value[torch.from_numpy(gguf_pack.llama_row_order(value.shape[0], entry.heads))]
    if entry.plus_one:
        value = value.float() + 1.0
    kind = float_type(value, options)
    if value.dim() != 2 or value.numel() <= FLOAT_ROWS_ELEMENTS:
        return float_bytes(value, kind)
    rows = max(1, FLOAT_ROWS_ELEMENTS // value.shape[1])
    first = float_bytes(value[:rows], kind)
    out = np.empty((value.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for i in range(rows, value.shape[0], rows):
        out[i: i + rows] = float_bytes(value[i: i + rows], kind)
    return out


def tokenizer_keys_equal(source: Path, written: Path) -> tuple[bool, str]:
    """Every tokenizer.* key of the source GGUF, byte for byte, in the written file."""
    mine, theirs = (gguf_header.raw_values(path, "tokenizer.") for path in (source, written))
    keys = list(mine)
    if not keys:
        return None, "the source GGUF has no tokenizer keys"
    differ = [name for name in keys if theirs.get(name) != mine[name]]
    added = [name for name in theirs if name not in mine]
    if differ or added:
        return False, f"keys differ from the source GGUF's: {', '.join((differ + added)[:6])}"
    return True, f"{len(keys)} tokenizer keys byte-identical to the source GGUF's"
