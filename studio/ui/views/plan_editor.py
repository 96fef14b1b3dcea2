"""The precision plan: every layer's bits, group size, method and skip flag, edited by hand, by
regex rule, or allocated automatically under a budget, with a live meter of what it will weigh
and the predicted loss; the Pareto curve of size against loss; recipes and exports.

Every edit builds a new Plan first; only a valid one replaces the session's plan, so a refused
edit (bits out of range, a regex matching nothing) leaves the plan exactly as it was.

"GGUF-native" restricts edits and auto-allocation to the GGUF types a studio grid is exactly
(Q4_0, Q5_0, Q8_0: 4/5/8 bits, symmetric, group 32, fp16 scales) and 16 bits, priced at their
GGUF bytes, so a variant of the plan exports to GGUF with no rounding.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.jobs import Progress
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.plan_ends import describe, effective_specs, ends_of, with_end
from studio.core.plan_rules import NOT_NATIVE, RULE_HELP, parse_rule  # noqa: F401 (re-exported)
from studio.ui.layout import FlowLayout, column
from studio.ui.plan_ends_row import PlanEnds
from studio.ui.plan_meter import meter_text
from studio.ui.plan_pareto import ParetoPlot
from studio.ui.plan_spec_fields import SpecFields
from studio.ui.plan_table import COLUMNS, PlanTable  # noqa: F401 (COLUMNS: re-exported)
from studio.ui.widgets import Refused, guarded


class PlanView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.size = None             # PlanSize of the current plan (the meter)
        self._sized: tuple = (None, None, None)   # (handle, plan, PlanSize) last measured
        self.loss: float | None = None
        self.allocation = None       # the last auto-allocation (for the Pareto plot)
        self.measured: list[dict] = []
        self.job = None
        self._stale = False   # the plan or model changed while the tab was hidden

        self.meter = QLabel()
        self.meter.setTextFormat(Qt.TextFormat.RichText)
        self.meter.setWordWrap(True)
        self.message = QLabel()
        self.message.setWordWrap(True)

        self.table = PlanTable()

        # Edit the selected layers.
        self.fields = SpecFields()
        self.bits, self.group, self.method = self.fields.bits, self.fields.group, self.fields.method
        self.symmetric, self.skip = self.fields.symmetric, self.fields.skip
        self.gguf_native = self.fields.gguf_native
        self.gguf_native.toggled.connect(self._native_toggled)
        self.ends = PlanEnds()   # the lm_head / embedding (a tied pair: one choice)
        self.ends.chosen.connect(self._end_chosen)
        self.ends.auto_changed.connect(self.refresh)
        apply_selected = QPushButton("Apply to selected")
        apply_selected.clicked.connect(self.apply_to_selected)
        set_default = QPushButton("Set as default")
        set_default.clicked.connect(self.set_default)
        clear = QPushButton("Clear rules")
        clear.clicked.connect(lambda: self._set_plan(Plan(self.state.session.plan.default, (),
                                                          self._architecture()), "Rules cleared."))

        self.rule = QLineEdit(placeholderText=RULE_HELP)
        self.rule.returnPressed.connect(self.apply_rule_text)
        apply_rule = QPushButton("Apply rule")
        apply_rule.clicked.connect(self.apply_rule_text)

        # Auto-allocation.
        self.target_kind = QComboBox()
        self.target_kind.addItems(["bits/weight", "MB"])
        self.target = QDoubleSpinBox(decimals=3, minimum=0.0, maximum=1e6, value=3.5)
        self.loss_kind = QComboBox()
        self.loss_kind.addItem("KL (end to end)", "kl")
        self.loss_kind.addItem("proxy (layer output)", "proxy")
        allocate = QPushButton("Auto-allocate")
        allocate.clicked.connect(self.auto_allocate)
        self.measure_button = QPushButton("Measure points")
        self.measure_button.setToolTip("quantize the chosen plan and three more points of the "
                                       "curve, and measure their KL and perplexity")
        self.measure_button.clicked.connect(self.measure_points)

        files = FlowLayout()   # rows wrap on a narrow screen
        files.addWidget(self.gguf_native)
        files.addSpacing(12)
        for label, slot in (("Save recipe…", self._save), ("Load recipe…", self._load),
                            ("Export llama.cpp…", lambda: self._export("llama")),
                            ("Export llm-compressor…", lambda: self._export("llmc"))):
            button = QPushButton(label)
            button.clicked.connect(slot)
            files.addWidget(button)
        files.addStretch(1)

        self.pareto = ParetoPlot()
        self.curve, self.chosen, self.points = (self.pareto.curve, self.pareto.chosen,
                                                self.pareto.points)
        self.pareto_note = self.pareto.note

        edit = FlowLayout()
        for widget in (QLabel("Bits"), self.bits, self.group, self.method, self.symmetric,
                       self.skip, apply_selected, set_default, clear):
            edit.addWidget(widget)
        edit.addStretch(1)
        rules = QHBoxLayout()
        rules.addWidget(QLabel("Rule"))
        rules.addWidget(self.rule, 1)
        rules.addWidget(apply_rule)
        auto = FlowLayout()
        for widget in (QLabel("Target"), self.target, self.target_kind, QLabel("minimising"),
                       self.loss_kind, allocate, self.measure_button):
            auto.addWidget(widget)
        auto.addStretch(1)
        left = column(edit, rules, (self.table, 1))
        right = column(auto, (self.pareto, 1), self.pareto_note)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([800, 600])
        layout = QVBoxLayout(self)
        layout.addWidget(self.meter)
        layout.addWidget(self.message)
        layout.addLayout(files)
        layout.addWidget(self.ends)
        layout.addWidget(split, 1)

        state.modelChanged.connect(self._model_changed)
        state.resultsChanged.connect(self._results_changed)
        state.layerSelected.connect(self._show_layer)
        self.table.currentCellChanged.connect(self._current_row_changed)
        self._model_changed(state.handle)

    # --- the plan -------------------------------------------------------------------------
    def _architecture(self) -> str | None:
        return self.state.handle.architecture if self.state.handle is not None else None

    def _set_plan(self, plan: Plan, message: str) -> bool:
        """Replace the session plan when `plan` is valid for this model; else say why."""
        handle = self.state.handle
        if handle is None:
            return False
        try:
            plan.check_architecture(handle.architecture)
            plan.resolve(handle.layers)  # every rule must match a layer
        except StudioError as exc:
            self.say(f"Refused: {exc} The plan is unchanged.", error=True)
            return False
        self.state.session.plan = plan
        self.state.publish("plan")
        self.say(message)
        return True

    def say(self, text: str, error: bool = False) -> None:
        self.message.setStyleSheet("color: #b00020;" if error else "")
        self.message.setText(text)

    def _native_toggled(self, native: bool) -> None:
        """The session plan itself changes only by an edit or an allocation."""
        self.fields.fix_native_grid(native)
        self.refresh()

    def edited_spec(self) -> QuantSpec | None:
        return self.fields.spec()

    def selected_names(self) -> list[str]:
        return self.table.selected_names()

    def _checked_spec(self) -> tuple[bool, QuantSpec | None]:
        """(True, the edited spec, None = keep 16-bit), or (False, None) after saying why not."""
        try:
            return True, self.edited_spec()
        except StudioError as exc:
            self.say(f"Refused: {exc} The plan is unchanged.", error=True)
            return False, None

    def apply_to_selected(self) -> None:
        names = self.selected_names()
        if not names:
            self.say("Select one or more layers first (Ctrl/Shift-click for several).", error=True)
            return
        ok, spec = self._checked_spec()
        if not ok:
            return
        plan = self.state.session.plan
        tied = [end for end in ends_of(self.state.handle.layers)
                if end.tied and set(end.names) & set(names)]
        for end in tied:   # one side of a tied pair is the whole matrix: both follow
            names += [n for n in end.names if n not in names]
        for name in names:
            plan = plan.with_rule(Rule(name, spec))
        label = "16-bit (skipped)" if spec is None else spec.label
        self._set_plan(plan, f"{len(names)} layer(s) -> {label}."
                       + (" The tied embedding and lm_head are one matrix: both follow."
                          if tied else ""))

    def _end_chosen(self, end, spec: QuantSpec | None) -> None:
        label = "kept 16-bit" if spec is None else spec.label
        self._set_plan(with_end(self.state.session.plan, end, spec), f"{end.title} -> {label}.")

    def set_default(self) -> None:
        ok, spec = self._checked_spec()
        if not ok:
            return
        plan = self.state.session.plan
        self._set_plan(Plan(spec, plan.rules, self._architecture()),
                       f"Default -> {'16-bit' if spec is None else spec.label}.")

    def apply_rule_text(self) -> None:
        try:
            rule = parse_rule(self.rule.text(), self.state.session.plan.default,
                              self.gguf_native.isChecked())
        except StudioError as exc:
            self.say(f"Refused: {exc} The plan is unchanged.", error=True)
            return
        if self._set_plan(self.state.session.plan.with_rule(rule),
                          f"Rule {rule.pattern} -> "
                          f"{'16-bit' if rule.spec is None else rule.spec.label} applied."):
            self.rule.clear()

    # --- auto-allocation -----------------------------------------------------------------
    def _table(self):
        from studio.core.allocate import loss_table

        result = self.state.session.results.get("sensitivity")
        if result is None:
            raise StudioError("Measure sensitivity first (Sensitivity tab): the allocator needs "
                              "each layer's measured loss.")
        kind = self.loss_kind.currentData()
        if kind == "kl" and not result.has_kl:
            raise StudioError("The sensitivity sweep was proxy-only: choose the proxy, or run "
                              "the sweep with KL windows.")
        plan = self.state.session.plan
        method = plan.default.method if plan.default is not None else None
        return loss_table(result, self.state.handle, kind=kind, method=method,
                          gguf_native=self.gguf_native.isChecked(), plan=plan,
                          auto=self.ends.auto_names()), result

    def auto_allocate(self):
        from studio.core.allocate import allocate

        if self.state.handle is None or self.job is not None:
            return None
        try:
            table, _ = self._table()
        except StudioError as exc:
            self.say(str(exc), error=True)
            return None
        value, in_mb = self.target.value(), self.target_kind.currentIndex() == 1
        architecture = self._architecture()

        def job():
            yield Progress(0, 1, "Allocating bits")
            answer = allocate(table, budget_mb=value if in_mb else None,
                              budget_bpw=None if in_mb else value)
            return answer, architecture

        return self._submit("Auto-allocate", job, self._allocated)

    def _submit(self, title: str, factory, on_ok):
        def finished(value) -> None:
            self.job = None
            if isinstance(value, Refused):
                self.say(f"Refused: {value} The plan is unchanged.", error=True)
            else:
                on_ok(value)
        self.job = self.state.submit(title, guarded(factory), on_result=finished)
        self.job.cancelled.connect(self._job_done)
        self.job.failed.connect(self._job_done)
        return self.job

    def _allocated(self, outcome) -> None:
        answer, architecture = outcome
        if architecture != self._architecture():
            return  # another model was opened meanwhile
        self.allocation = answer
        self.measured = []
        solver = "exact optimum" if answer.exact else f"within {answer.gap:.3g} of the optimum"
        # Every layer gets an exact rule; the user's default stays for anything else.
        plan = Plan(self.state.session.plan.default, answer.plan.rules, architecture)
        ends = describe(plan, self.state.handle.layers)
        self._set_plan(plan, f"Auto-allocated: {answer.bpw:.3f} bits/weight, "
                                    f"{answer.size_mb:.2f} MB, predicted loss {answer.loss:.4g} "
                                    f"({solver})." + (f" Ends, counted in the size: "
                                                      f"{ends}." if ends else ""))
        self._draw_pareto()

    def measure_points(self):
        """Quantize the chosen plan and three more optimal points, measure KL and perplexity
        (core.plan_points, on a short text)."""
        from studio.core import plan_points
        from studio.core.text import text_windows

        handle = self.state.handle
        if handle is None or self.job is not None:
            return None
        if self.allocation is None:
            self.say("Auto-allocate first: the points measured lie on its curve.", error=True)
            return None
        try:
            table, _ = self._table()
        except StudioError as exc:
            self.say(str(exc), error=True)
            return None
        targets = plan_points.point_targets(self.allocation)

        def job():  # the text is tokenized here, off the UI thread
            windows, _ = text_windows(handle.tokenizer, None, plan_points.SEQLEN,
                                      plan_points.WINDOWS, seed=plan_points.SEED)
            points = yield from plan_points.measure_points_job(handle, table, targets, windows)
            return [p.to_dict() for p in points]

        self.say(f"Measuring {len(targets)} points on the built-in text "
                 f"({plan_points.WINDOWS} x {plan_points.SEQLEN} tokens)…")
        return self._submit("Measure plan points", job, self._measured)

    def _measured(self, points: list[dict]) -> None:
        self.measured = points
        text = "; ".join(f"{p['bpw']:.2f} bpw: KL {p['kl']:.4f} (predicted {p['predicted']:.4f}), "
                         f"ppl {p['ppl']:.2f}" for p in points)
        self.say(f"Measured: {text}.")
        self._draw_pareto()

    def _job_done(self, *_) -> None:
        self.job = None

    # --- state and drawing ----------------------------------------------------------------
    def _model_changed(self, handle) -> None:
        self.allocation = None
        self.measured = []
        self.table.set_layers(handle.layers if handle is not None else [])
        self.refresh()
        self._draw_pareto()

    def _results_changed(self, key: str) -> None:
        if key in ("plan", "sensitivity"):
            self.refresh()

    def _current_row_changed(self, row: int, *_) -> None:
        item = self.table.item(row, 0) if row >= 0 else None
        if item is not None:
            self.state.select_layer(item.text())

    def _show_layer(self, name: str) -> None:
        self.table.show_layer(name)

    def refresh(self) -> None:
        """Re-read the session plan: the table and the meter. Behind another tab of a shown
        window, only marked stale and done by showEvent: filling the table's 2,300 cells and
        sizing the plan took 0.7 s of the UI thread at every open (under load)."""
        from studio.core.allocate import plan_size, predicted_loss

        if self.window().isVisible() and not self.isVisible():
            self._stale = True
            return
        self._stale = False
        handle = self.state.handle
        if handle is None:
            self.meter.setText("No model open.")
            return
        plan = self.state.session.plan
        specs = effective_specs(plan, handle.layers)   # a tied pair: one matrix, both rows
        self.table.fill(plan, handle.layers, specs)
        auto = self.ends.auto_names()   # the ends Auto-allocate chooses count in its bpw
        if self._sized[0] is not handle or self._sized[1] != (plan, auto):
            self._sized = (handle, (plan, auto), plan_size(handle, plan, auto))
        self.size = self._sized[2]
        self.ends.show_plan(plan, handle.layers, self.gguf_native.isChecked(), self.size)
        result = self.state.session.results.get("sensitivity")
        self.loss, why = (None, "measure sensitivity to predict it")
        if result is not None:
            kind = self.loss_kind.currentData()
            kind = kind if (kind != "kl" or result.has_kl) else "proxy"
            self.loss, why = predicted_loss(result, plan, kind)
        self.meter.setText(meter_text(self.size, self.loss, why, plan, handle, specs,
                                      self.gguf_native.isChecked()))
        self._draw_pareto()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt API)
        super().showEvent(event)
        if self._stale:
            self.refresh()
            if self.state.selected_layer:
                self.table.show_layer(self.state.selected_layer)

    def _draw_pareto(self) -> None:
        self.pareto.draw(self.allocation, self.measured, self.loss_kind.currentData())

    # --- files ----------------------------------------------------------------------------
    def _save(self, path: str | None = None) -> None:
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Save recipe", "plan.json",
                                                  "Recipe (*.json)")
        if path:
            self.state.session.plan.save(path)
            self.say(f"Recipe saved to {path}.")

    def _load(self, path: str | None = None) -> None:
        if not path:
            path, _ = QFileDialog.getOpenFileName(self, "Load recipe", "", "Recipe (*.json)")
        if not path:
            return
        try:
            plan = Plan.load(path)
        except StudioError as exc:
            self.say(f"Refused: {exc} The plan is unchanged.", error=True)
            return
        self._set_plan(plan, f"Recipe {Path(path).name} loaded.")

    def _export(self, kind: str, path: str | None = None) -> None:
        from studio.core.plan_export import llama_cpp_export, llm_compressor_export

        handle = self.state.handle
        if handle is None:
            return
        export, name, filt = ((llama_cpp_export, "tensor-types.txt", "Text (*.txt)")
                              if kind == "llama" else
                              (llm_compressor_export, "recipe.yaml", "YAML (*.yaml)"))
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Export", name, filt)
        if not path:
            return
        try:
            written = export(handle, self.state.session.plan)
        except StudioError as exc:
            self.say(f"Not exported: {exc}", error=True)
            return
        written.save(path)
        self.say(f"Exported to {path}. " + " ".join(written.notes))

