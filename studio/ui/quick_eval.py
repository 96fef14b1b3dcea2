"""Every new variant gets a short evaluation and a row in Compare next to the baseline.

Watches the session's variants; each one not seen before is evaluated with
`studio.core.runs.quick_eval_job` (size from Preferences; the baseline's side comes from the
baseline cache after the first). A failure leaves the variant and the Compare table as they
were, adds the variant's row with the reason, and reaches the user through the error path.
"""
from __future__ import annotations

from studio.core.runs import describe_variant, quick_eval_job
from studio.ui import settings


class QuickEval:
    def __init__(self, state) -> None:
        self.state = state
        self.seen: set[int] = set()
        self.jobs: dict[str, object] = {}
        state.modelChanged.connect(self._model_changed)
        state.resultsChanged.connect(self._results_changed)

    def _model_changed(self, _handle) -> None:
        # Variants restored with a session (or of a model opened before) are not new.
        self.seen = {id(v) for v in self.state.session.variants.values()}

    def _results_changed(self, key: str) -> None:
        if key != "variants":
            return
        for variant in list(self.state.session.variants.values()):
            if id(variant) not in self.seen:
                self.seen.add(id(variant))
                if settings.get("quick_eval") and self.state.handle is not None:
                    self.start(variant)

    def start(self, variant):
        handle = self.state.handle
        if not handle.text_ready:   # (asked without parsing a tokenizer on the UI thread)
            self._failed(variant, "the model has no tokenizer, so no text can be evaluated")
            return None
        windows, seqlen = settings.quick_eval()
        job = self.state.submit(f"Quick evaluation of {variant.name}",
                                lambda: quick_eval_job(variant, handle, windows, seqlen),
                                on_result=self._evaluated)
        job.failed.connect(lambda message, _details: self._failed(variant, message))
        self.jobs[variant.name] = job
        return job

    def _evaluated(self, runs: list[dict]) -> None:
        if any(r["variant"] in self.state.session.variants or r["variant"] == "baseline"
               for r in runs):
            self.state.add_runs(runs)

    def _failed(self, variant, message: str) -> None:
        if self.state.session.variants.get(variant.name) is variant:
            self.state.add_runs([{**describe_variant(variant), "kind": "note",
                                  "note": f"quick evaluation failed: {message}"}])
