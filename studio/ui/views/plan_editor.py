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

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK, fits_rows
from studio.core.jobs import Progress
from studio.core.plan import GROUP_SIZES, Plan, QuantSpec, Rule
from studio.core.plan_ends import describe, effective_specs, ends_of, with_end
from studio.core.plan_rules import NOT_NATIVE, RULE_HELP, parse_rule  # noqa: F401 (re-exported)
from studio.core.quant import registry
from studio.core.quant.grid import native_gguf_type
from studio.ui.layout import FlowLayout, column
from studio.ui.plan_ends_row import PlanEnds
from studio.ui.widgets import Refused, guarded, method_tooltips

COLUMNS = ("Layer", "Block", "Role", "Shape", "Bits", "Group", "Method", "Sym", "Scales", "Skip",
           "From")
def _item(text: str, align_right: bool = False) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
    if align_right:
        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return item


class PlanView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.names: list[str] = []
        self.size = None             # PlanSize of the current plan (the meter)
        self._sized: tuple = (None, None, None)   # (handle, plan, PlanSize) last measured
        self.loss: float | None = None
        self.allocation = None       # the last auto-allocation (for the Pareto plot)
        self.measured: list[dict] = []
        self.job = None

        self.meter = QLabel()
        self.meter.setTextFormat(Qt.TextFormat.RichText)
        self.meter.setWordWrap(True)
        self.message = QLabel()
        self.message.setWordWrap(True)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)

        # Edit the selected layers.
        self.bits = QSpinBox(minimum=1, maximum=16, value=4)  # out-of-range values are refused
        self.group = QComboBox()
        for size in GROUP_SIZES:
            self.group.addItem("per-channel" if size == -1 else f"g{size}", size)
        self.group.setCurrentIndex(GROUP_SIZES.index(128))
        self.method = QComboBox()
        for quantizer in registry.all_quantizers():  # plug-ins' methods included
            self.method.addItem(quantizer.name, quantizer.name)
        method_tooltips(self.method)
        self.symmetric = QCheckBox("symmetric")
        self.skip = QCheckBox("skip (keep 16-bit)")
        self.gguf_native = QCheckBox("GGUF-native (llama.cpp types, exact export)")
        self.gguf_native.setToolTip(
            "Plan only what a GGUF type holds exactly: Q4_0, Q5_0, Q8_0 (4, 5, 8 bits, "
            "symmetric, group 32, fp16 scales) or 16-bit. Auto-allocation chooses among them at "
            "their real GGUF bytes (layers whose rows are not multiples of 32 stay 16-bit; it "
            "needs a GGUF-native sensitivity sweep), and a variant of the plan exports to GGUF "
            "with no rounding.")
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

        self.pareto = pg.PlotWidget()
        self.pareto.setBackground("w")
        self.pareto.setLabel("bottom", "average bits per weight (scales counted)")
        self.pareto.setLabel("left", "total KL (nats/token)")
        self.pareto.setLogMode(y=True)
        self.pareto.getAxis("left").enableAutoSIPrefix(False)
        self.pareto.showGrid(x=True, y=True, alpha=0.2)
        self.pareto.addLegend(offset=(-10, 10))
        self.curve = self.pareto.plot(pen=pg.mkPen("#1f77b4", width=2), name="predicted optimum")
        self.chosen = pg.ScatterPlotItem(size=16, symbol="star", brush="#d62728", pen=None,
                                         name="chosen plan")
        self.points = pg.ScatterPlotItem(size=9, symbol="o", brush="#2ca02c", pen="k",
                                         name="measured")
        self.pareto.addItem(self.points)
        self.pareto.addItem(self.chosen)  # on top of a measured point at the same place
        self.pareto_note = QLabel("Auto-allocate to see the curve.")
        self.pareto_note.setWordWrap(True)

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
        """GGUF-native fixes the grid (group 32, symmetric, fp16 scales): only the width is
        chosen by hand. The session plan itself changes only by an edit or an allocation."""
        if native:
            self.group.setCurrentIndex(self.group.findData(BLOCK))
            self.symmetric.setChecked(True)
        self.group.setEnabled(not native)
        self.symmetric.setEnabled(not native)
        self.refresh()

    def edited_spec(self) -> QuantSpec | None:
        if self.skip.isChecked():
            return None
        native = self.gguf_native.isChecked()
        spec = QuantSpec(bits=self.bits.value(), group_size=self.group.currentData(),
                         symmetric=self.symmetric.isChecked(), method=self.method.currentText(),
                         scale_dtype="fp16" if native else "fp32")
        if native and native_gguf_type(spec) is None:
            raise StudioError(NOT_NATIVE)
        return spec

    def selected_names(self) -> list[str]:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [self.names[r] for r in rows]

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
        self.names = []
        self.table.setRowCount(0)
        if handle is not None:
            self.names = [i.name for i in handle.layers]
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
        """Make the current layer the table's current row (a multi-row selection the user is
        editing stays when it already holds that layer)."""
        item = self.table.item(self.table.currentRow(), 0)
        if item is not None and item.text() == name:
            return
        matches = self.table.findItems(name, Qt.MatchFlag.MatchExactly)
        for match in matches:
            if match.column() == 0:
                if name in self.selected_names():
                    self.table.setCurrentCell(match.row(), 0,
                                              self.table.selectionModel().SelectionFlag.NoUpdate)
                else:
                    self.table.setCurrentCell(match.row(), 0)
                self.table.scrollToItem(match)
                return

    def refresh(self) -> None:
        """Re-read the session plan: the table and the meter."""
        from studio.core.allocate import plan_size, predicted_loss

        handle = self.state.handle
        if handle is None:
            self.meter.setText("No model open.")
            return
        plan = self.state.session.plan
        specs = effective_specs(plan, handle.layers)   # a tied pair: one matrix, both rows
        partners = _tied_partners(handle.layers)
        if self.table.rowCount() != len(handle.layers):
            self.table.clearContents()
            self.table.setRowCount(len(handle.layers))
        for row, info in enumerate(handle.layers):
            spec = specs[info.name]
            origin = _origin(plan, info, partners.get(info.name))
            cells = [info.name, "" if info.block is None else str(info.block), info.role,
                     "x".join(map(str, info.shape)),
                     "16" if spec is None else str(spec.bits),
                     "" if spec is None else ("ch" if spec.group_size == -1
                                              else str(spec.group_size)),
                     "" if spec is None else spec.method,
                     "" if spec is None or not spec.symmetric else "yes",
                     _scales(spec), "yes" if spec is None else "", origin]
            for col, text in enumerate(cells):
                # Only the cells that changed: a new sensitivity result, or a rule on a few
                # layers, used to rebuild all 2,300 items of the demo (0.2 s of the UI thread).
                old = self.table.item(row, col)
                if old is None or old.text() != text:
                    self.table.setItem(row, col, _item(text, align_right=col in (1, 4, 5)))
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
        loss = f"{self.loss:.4g}" if self.loss is not None else f"— ({why})"
        default = "16-bit" if plan.default is None else plan.default.label
        native = (f" · {_gguf_mix(handle, specs)}" if self.gguf_native.isChecked() else "")
        self.meter.setText(
            f"{self.size.bits_words(f'<b>{self.size.budget_bpw:.3f}</b>')} (scales and "
            f"zeros counted) · "
            f"<b>{self.size.size_mb:.2f}</b> MB ({self.size.size_bytes:,} bytes) · "
            f"predicted loss <b>{loss}</b> · default {default} · {len(plan.rules)} rule(s) · "
            f"{self.size.quantized} layers quantized{native}")
        self._draw_pareto()

    def _draw_pareto(self) -> None:
        answer = self.allocation
        if answer is None:
            self.curve.setData([], [])
            self.chosen.setData([], [])
            self.points.setData([], [])
            return
        curve = answer.pareto
        kind = self.loss_kind.currentData()
        self.pareto.setLabel("left", "total KL (nats/token)" if kind == "kl"
                             else "sum of layer output errors (proxy)")
        keep = curve.loss > 0  # log axis: the all-16-bit end has zero loss
        self.curve.setData(curve.bpw[keep], curve.loss[keep])
        if answer.loss > 0:
            self.chosen.setData([answer.bpw], [np.log10(answer.loss)])
        self.points.setData([p["bpw"] for p in self.measured],
                            [np.log10(max(p["kl"], 1e-12)) for p in self.measured])
        self.pareto_note.setText(
            f"Blue: least predicted loss at each size (sum of per-layer losses, assumed "
            f"additive; a layer's KL is measured at the sweep's * options and predicted from "
            f"its output error at the others). "
            f"Red star: the chosen plan ({answer.bpw:.3f} bpw). Green: measured KL of real "
            f"quantized models.")

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


def _scales(spec: QuantSpec | None) -> str:
    """The Scales cell: "fp16 (Q4_0)" for a GGUF-native spec, "fp16" or "" (fp32) otherwise."""
    if spec is None or spec.scale_dtype == "fp32":
        return ""
    native = native_gguf_type(spec)
    return f"fp16 ({native.name})" if native is not None else "fp16"


def _gguf_mix(handle, specs: dict) -> str:
    """"GGUF: Q4_0 x 9, F16 x 5" over the block linears, and how many layers are no GGUF type
    yet, so a plan that would round on export shows it."""
    counts: dict[str, int] = {}
    for info in handle.quantizable:
        spec = specs.get(info.name)
        native = native_gguf_type(spec) if fits_rows(info.shape[1]) else None
        kind = "F16" if spec is None else (native.name if native is not None else "not GGUF-native")
        counts[kind] = counts.get(kind, 0) + 1
    mix = ", ".join(f"{k} x {n}" for k, n in sorted(counts.items()) if k != "not GGUF-native")
    stray = counts.get("not GGUF-native", 0)
    return (f"GGUF: {mix or 'none yet'}"
            + (f" · <span style='color:#b00020'>{stray} layer(s) not GGUF-native</span>"
               if stray else ""))


def _tied_partners(layers) -> dict:
    """name -> the LayerInfo it shares its matrix with (a tied embedding and lm_head)."""
    by_name = {info.name: info for info in layers}
    partners = {}
    for info in layers:
        if info.tied_to and info.tied_to in by_name:
            partners.setdefault(info.name, by_name[info.tied_to])
            partners.setdefault(info.tied_to, info)
    return partners


def _origin(plan: Plan, info, partner) -> str:
    """Which part of the plan decides this layer: an exact rule, a regex, the default, or (a
    tied embedding) the lm_head whose matrix it is (`partner`)."""
    if partner is not None and not any(r.matches(info.name) for r in plan.rules) \
            and plan.spec_for(partner.name, default_applies=False) is not None:
        return f"tied: the {partner.role}'s matrix"
    for rule in plan.rules:
        if not rule.regex and rule.pattern == info.name:
            return "layer rule"
    for rule in reversed(plan.rules):
        if rule.regex and rule.matches(info.name):
            return f"regex {rule.pattern}"
    return "default" if info.quantizable else "not quantized"
