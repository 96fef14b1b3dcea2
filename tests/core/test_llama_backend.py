"""The llama.cpp backend: listed in the one registry, unavailable with the install command when
the binding is missing (the torch figures still come out), a GGUF it cannot load named
clearly, and, with the binding, benchmark figures with their build and perplexity that agrees
with the torch path."""
import json

import pytest
import torch

from studio.core import backends
from studio.core.bench import base_targets, bench_job, gguf_target
from studio.core.export import llama_cpp
from studio.core.jobs import run

needs_binding = pytest.mark.skipif(not llama_cpp.available(), reason="cyllama is not installed")


def write_tiny_gguf(handle, folder):
    """`handle`'s model as a W4 g32 GGUF (fp16 scales: Q4_0-exact), written by the exporter."""
    from studio.core.export.base import ExportOptions
    from studio.core.export.gguf import GGUF
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job

    plan = Plan(QuantSpec(4, 32, True, scale_dtype="fp16"))
    variant = run(quantize_job(handle, plan, None, None, "tiny q4"))
    return run(GGUF.write_job(variant, handle, ExportOptions(), None, folder)).file


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    return write_tiny_gguf(tiny_llama, tmp_path_factory.mktemp("gguf"))


def fp32_target(handle):
    return base_targets(handle.model, ("fp32",), layer_names=[i.name for i in handle.quantizable])


def test_backends_are_declared_once_with_their_install_command(monkeypatch):
    assert backends.backend_names() == ("torch", "llama.cpp")
    assert backends.get_backend("torch").unavailable_reason() is None
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    reason = backends.get_backend("llama.cpp").unavailable_reason()
    assert "pip install 'compression-studio[llama-cpp]'" in reason
    with pytest.raises(Exception, match="Unknown backend"):
        backends.get_backend("onnx")


def test_without_the_binding_torch_figures_still_come_out(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    results = run(bench_job(fp32_target(tiny_llama) + [gguf_target(fake)], 384, 8, 4, 1))
    torch_run, llama_run = results
    assert torch_run.error is None and torch_run.decode_tok_s > 0
    assert torch_run.backend == "torch" and torch_run.build["torch"] == torch.__version__
    assert llama_run.error and "compression-studio[llama-cpp]" in llama_run.error
    assert json.dumps(llama_run.to_dict())   # a failed row still reports (valid JSON, no NaN)


def test_gguf_helpers_find_the_file_a_model_argument_stands_for(tiny_dirs, tmp_path):
    assert backends.gguf_of(tiny_dirs["llama"]) is None         # a plain folder has none
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert backends.gguf_of(gguf) == gguf
    assert "export" in backends.no_gguf_message("VARIANT")


@needs_binding
def test_a_gguf_llama_cpp_cannot_load_is_a_clear_message(tiny_llama, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    results = run(bench_job(fp32_target(tiny_llama) + [gguf_target(bad)], 384, 8, 4, 1))
    assert results[0].error is None
    assert results[1].error.startswith("llama.cpp could not load broken.gguf")


@needs_binding
def test_llama_cpp_bench_reports_figures_build_and_kernels(tiny_llama, tiny_gguf):
    results = run(bench_job(fp32_target(tiny_llama) + [gguf_target(tiny_gguf)], 384, 12, 6, 1,
                            threads=1))
    torch_run, llama_run = results
    assert llama_run.error is None and llama_run.backend == "llama.cpp"
    assert (llama_run.prompt_tokens, llama_run.new_tokens) == (12, 6)
    assert llama_run.prefill_ms > 0 and llama_run.decode_tok_s > 0
    assert llama_run.build["binding"].startswith("cyllama") and llama_run.build["threads"] == 1
    assert llama_run.build["threads"] == torch_run.build["threads"] == 1
    kinds = {k.kernel for k in llama_run.kernels}
    assert "llama.cpp Q4_0" in kinds
    assert llama_run.weights_read_mb > 0 and llama_run.size_mb > 0
    data = llama_run.to_dict()
    assert data["backend"] == "llama.cpp" and data["decode_loop"] == "llama.cpp"


@needs_binding
def test_cli_bench_runs_both_backends(tiny_dirs, tiny_gguf, capsys):
    from studio.cli import main

    code = main(["bench", str(tiny_dirs["llama"]), "--backend", "torch,llama.cpp", "--gguf",
                 str(tiny_gguf), "--prompt-tokens", "8", "--new-tokens", "4", "--repeat", "1",
                 "--threads", "1", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in data["runs"]] == ["torch", "llama.cpp"]
    assert all(r["decode_tok_s"] > 0 for r in data["runs"])


def agreement(gguf, handle, text, seqlen):
    from studio.core.evaluate import evaluate_gguf_job

    return run(evaluate_gguf_job(gguf, handle.model, handle.tokenizer, text, seqlen, 2))


@needs_binding
def test_llama_cpp_perplexity_agrees_with_torch_on_the_tiny_export(tiny_llama, tiny_gguf):
    """The export holds the variant's codes exactly, so the variant's torch figures are the
    reference here: llama.cpp differs by its 8-bit activations only."""
    from studio.core.evaluate import evaluate_job
    from studio.core.models import open_model_job

    reopened = run(open_model_job(tiny_gguf))   # the same file through transformers (torch)
    result = agreement(tiny_gguf, reopened, None, 32)
    torch_result = run(evaluate_job(reopened.model, None, tiny_llama.tokenizer, None, 32, 2))
    assert result.backend == "llama.cpp" and result.windows == 2
    assert result.base_ppl == pytest.approx(torch_result.ppl, rel=1e-6)
    assert result.ppl == pytest.approx(result.base_ppl, rel=0.02)
    assert result.top1 >= 0.9


@needs_binding
def test_llama_cpp_perplexity_agrees_with_torch_on_the_demo(demo_handle, shared_data):
    from studio.core.models import demo_gguf_path

    result = agreement(demo_gguf_path(), demo_handle, shared_data / "wikitext2_test.txt", 128)
    assert result.ppl == pytest.approx(result.base_ppl, rel=0.02)
    assert result.top1 >= 0.9


@needs_binding
def test_cli_eval_on_llama_cpp_and_a_variant_without_gguf(tiny_llama, tiny_dirs, tiny_gguf,
                                                          tmp_path, capsys):
    from studio.cli import main
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job
    from studio.core.variant import save_variant

    code = main(["eval", str(tiny_gguf), "--backend", "llama.cpp", "--seqlen", "32",
                 "--windows", "2", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "llama.cpp" and data["build"]["binding"].startswith("cyllama")
    assert data["ppl"] == pytest.approx(data["base_ppl"], rel=0.02) and data["top1"] >= 0.9
    # A VARIANT has no GGUF until exported: the torch figures come out, llama.cpp says why.
    variant = run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32)), None, None, "w4"))
    save_variant(variant, tmp_path / "w4")
    assert main(["bench", str(tmp_path / "w4"), "--backend", "torch,llama.cpp",
                 "--prompt-tokens", "8", "--new-tokens", "3", "--repeat", "1"]) == 0
    out = capsys.readouterr()
    assert "w4" in out.out and "export it first" in out.err
    assert main(["bench", str(tmp_path / "w4"), "--backend", "llama.cpp"]) == 2


@needs_binding
def test_a_cancelled_generation_stops_the_llama_cpp_process(tiny_gguf):
    from studio.core.jobs import Progress

    runner = llama_cpp.Generator(tiny_gguf, 64)
    job = runner.timed_generation(torch.zeros(1, 8, dtype=torch.long), 48, Progress(0, 1, ""))
    next(job)                      # the first progress reply: the child is mid-request
    job.close()                    # what a cancel does to the job
    assert runner.worker.child.poll() is not None


def test_an_abort_in_llama_cpp_ends_its_process_not_the_studio(tiny_gguf, tmp_path, monkeypatch):
    # A stand-in worker that dies as llama.cpp does on a failed GGML_ASSERT (the real case,
    # a file llama.cpp aborts on, is in test_export_gguf_vocab.py)
    script = tmp_path / "worker.py"
    script.write_text("import os, sys\nsys.stdin.buffer.read(4)\n"
                      "sys.stderr.write('ggml.c:42: GGML_ASSERT(buffer) failed\\n')\n"
                      "sys.stderr.flush()\nos.abort()\n")
    monkeypatch.setattr(llama_cpp, "WORKER_SCRIPT", script)
    with pytest.raises(Exception) as caught:
        llama_cpp.logits(tiny_gguf, torch.zeros(1, 8, dtype=torch.long))
    message = str(caught.value)
    assert "llama.cpp stopped" in message and "SIGABRT" in message
    assert "GGML_ASSERT(buffer) failed" in message and "unaffected" in message
