"""llama.cpp in a child process: the other end of `llama_cpp.Worker`.

llama.cpp stops the whole process when one of its checks fails (GGML_ASSERT calls abort()), and
files that pass every check of the studio's can still trip one (a layout llama.cpp's build does
not support, a corrupt tensor). Run in the studio's own process, that would close the window and
lose the session; run here, it ends this process and the studio reports it.

This file runs as a script (`python llama_worker.py`), not as part of the package: it imports
only the binding and NumPy, so it starts in well under a second. Requests and replies are
frames on stdin/stdout: a 4-byte length, then JSON; a reply with "bytes": n is followed by one
more frame of n raw bytes (logits as float32).
"""
from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time


def read_frame(stream) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack("<I", head)
    return stream.read(size)


def write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack("<I", len(data)))
    stream.write(data)


def reply(stream, message: dict, payload: bytes | None = None) -> None:
    if payload is not None:
        message = {**message, "bytes": len(payload)}
    write_frame(stream, json.dumps(message).encode())
    if payload is not None:
        write_frame(stream, payload)
    stream.flush()


class Session:
    """One model and context, opened by the first "open" request."""

    def __init__(self, out) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read when the library loads
        import cyllama.llama.llama_cpp as cy

        self.cy, self.out = cy, out
        cy.disable_logging()
        cy.ggml_backend_load_all()
        self.model = self.context = None

    def open(self, path: str, threads: int, n_ctx: int) -> None:
        cy = self.cy

        class Model(cy.LlamaModel):
            @property
            def n_vocab(self) -> int:       # what get_logits_ith reads (missing in 0.2.18)
                return self.get_vocab().n_vocab

        model_params = cy.LlamaModelParams()
        model_params.n_gpu_layers = 0
        self.model = Model(path, model_params)
        context_params = cy.LlamaContextParams()
        context_params.n_ctx = n_ctx
        context_params.n_batch = context_params.n_ubatch = n_ctx
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.no_perf = True
        self.context = cy.LlamaContext(self.model, context_params)
        reply(self.out, {"n_vocab": self.model.n_vocab})

    def logits(self, tokens: list[int]) -> None:
        """Every position's logits for one window, from an empty context."""
        import numpy as np

        cy, context = self.cy, self.context
        context.kv_cache_clear()
        batch = cy.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1)
        for position, token in enumerate(tokens):
            batch.add(token, position, [0], True)
        context.decode(batch)
        rows = np.array([context.get_logits_ith(i) for i in range(len(tokens))], dtype=np.float32)
        reply(self.out, {"shape": list(rows.shape)}, rows.tobytes())

    def generate(self, prompt: list[int], new_tokens: int) -> None:
        """Timed greedy generation: prefill asks for the last position's logits only; each step
        decodes one token and samples with llama.cpp's own greedy sampler. A progress reply every
        16 steps lets the studio cancel; its cost is outside the timed spans."""
        cy, context = self.cy, self.context
        sampler = cy.LlamaSampler(cy.LlamaSamplerChainParams())
        sampler.add_greedy()
        context.kv_cache_clear()
        batch = cy.LlamaBatch(n_tokens=len(prompt), embd=0, n_seq_max=1)
        for position, token in enumerate(prompt):
            batch.add(token, position, [0], position == len(prompt) - 1)
        start = time.perf_counter()
        context.decode(batch)
        token = sampler.sample(context, -1)
        prefill = time.perf_counter() - start
        step_batch = cy.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        decode, position = 0.0, len(prompt)
        for step in range(new_tokens):
            start = time.perf_counter()
            step_batch.clear()
            step_batch.add(token, position, [0], True)
            context.decode(step_batch)
            token = sampler.sample(context, -1)
            position += 1
            decode += time.perf_counter() - start
            if step % 16 == 15:
                reply(self.out, {"progress": step + 1})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux
        reply(self.out, {"prefill": prefill, "decode": decode, "peak_rss": peak})

    def tokenize(self, text: str, add_special: bool) -> None:
        ids = self.model.get_vocab().tokenize(text, add_special, False)
        reply(self.out, {"ids": [int(i) for i in ids]})

    def quantize(self, source: str, target: str, ftype: int, threads: int,
                 token_embedding_type: int | None = None,
                 output_tensor_type: int | None = None) -> None:
        params = self.cy.LlamaModelQuantizeParams()
        params.ftype = ftype
        params.nthread = threads
        if token_embedding_type is not None:
            params.token_embedding_type = token_embedding_type
        if output_tensor_type is not None:
            params.output_tensor_type = output_tensor_type
        params.allow_requantize = True       # the demo ships already quantized (Q4_1)
        self.cy.model_quantize(source, target, params)
        reply(self.out, {})


def main() -> None:
    requests = sys.stdin.buffer
    # The protocol owns the real stdout; anything the library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    session = Session(out)
    while (frame := read_frame(requests)) is not None:
        request = json.loads(frame)
        operation = getattr(session, request.pop("op"))
        try:
            operation(**request)
        except Exception as exc:  # a refusal the binding raises (not an abort): report, go on
            reply(out, {"error": f"{exc}" or type(exc).__name__})


if __name__ == "__main__":
    main()
