"""The Plan tab's row for the model's ends: the lm_head and the embedding, or one choice for a
tied pair (one matrix), each set to keep / W8 per channel / a grouped width. The plan table
below lists the same layers, so any bits / group / method can be set there as well; this row
is the quick choice llama-quantize offers as --output-tensor-type / --token-embedding-type.
"auto" leaves the width to Auto-allocate, which chooses it from the end's measured loss like
any layer's (`allocate.loss_table(auto=)`); until then the plan keeps what it has.
"""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QWidget

from studio.core.errors import StudioError
from studio.core.plan import end_spec
from studio.core.plan_ends import End, end_setting, ends_of, in_method, method_notes

# (command-line word, label): what `quantize --lm-head` takes, most kept first.
CHOICES = (("keep", "keep 16-bit"), ("w8", "W8 per channel (int8 kernel)"),
           ("w6g32sym", "W6 g32 sym"), ("w5g32", "W5 g32"), ("w4g32", "W4 g32 (int4 kernel)"),
           ("w4g128", "W4 g128"), ("auto", "auto (Auto-allocate chooses)"))
NATIVE_CHOICES = (("keep", "keep 16-bit"), ("w8", "Q8_0"), ("w5", "Q5_0"), ("w4", "Q4_0"),
                  ("auto", "auto (Auto-allocate chooses)"))
TOOLTIP = ("The output head's error reaches every logit, so llama.cpp keeps it above the "
           "body's width (Q6_K / Q8_0); W8 per channel is near-lossless, halves the 16-bit "
           "matrix and runs on the int8 kernel. A tied embedding is the same matrix: one "
           "choice, stored once. An untied embedding is read one row per token: quantizing "
           "it saves size, not time. The allocator keeps these as set and counts them in its "
           "budget; 'auto' lets it choose their width from their measured sensitivity, like "
           "any layer's. The table below sets any bits / group / method on these rows too.\n"
           "Method: the lm_head runs the plan's method when it learns from a layer's inputs "
           "(GPTQ on the final hidden states' Hessian; a tied pair too, the embedding reading "
           "the same matrix). Under AWQ an untied lm_head gets AWQ's scales from the final "
           "hidden states, folded into the final norm; a tied one gets RTN on AWQ's grid, as "
           "the fold would scale the embedding it shares. An untied embedding and SmoothQuant "
           "get RTN on the method's grid.")


class PlanEnds(QWidget):
    """One combo box per End; emits `chosen(end, spec)` when the user picks a setting, and
    `auto_changed` when an end is set to auto or back (a bpw budget then counts it: the meter
    re-reads `auto_names`)."""
    chosen = Signal(object, object)
    auto_changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[End] = []
        self.auto: set[End] = set()   # the ends Auto-allocate chooses
        self.boxes: list[QComboBox] = []
        self.native = False
        self.body = None        # the plan's default spec: its method is the ends' too
        self.share = QLabel()   # what the ends weigh in the plan's size
        self.row = QHBoxLayout(self)
        self.row.setContentsMargins(0, 0, 0, 0)
        self.setToolTip(TOOLTIP)

    def show_plan(self, plan, layers, native: bool, size=None) -> None:
        """Rebuild for the model's ends, each showing what `plan` does with it; `size` (the
        plan's `allocate.PlanSize`) says what they weigh."""
        ends = ends_of(layers) if layers is not None else []
        if ends != self.ends or native != self.native or not self.boxes and ends:
            self._build(ends, native)
        self.body = plan.default
        notes = method_notes(plan, layers or [])
        for end, box in zip(self.ends, self.boxes):
            spec, apart = end_setting(plan, layers, end)
            # (by the title it starts with: a tied pair's title holds ": " itself)
            note = next((n for n in notes if n.startswith(end.title + ": ")), None)
            box.setToolTip(TOOLTIP + (f"\nNow: {note}." if note else ""))
            box.blockSignals(True)
            while box.count() > len(self._choices()):   # a custom setting shown last time
                box.removeItem(box.count() - 1)
            index = next((i for i in range(box.count()) if box.itemData(i) != "auto"
                          and _grid(self._spec(box.itemData(i), end)) == _grid(spec)), -1)
            now = "16-bit" if spec is None else spec.grid_label
            box.setItemText(self._auto_index(), f"auto (allocator; now {now})")
            if end in self.auto:
                index = self._auto_index()
            elif index < 0 or apart:
                how = "keep 16-bit" if spec is None else spec.label
                box.addItem(f"{how} (set in the table{', untied' if apart else ''})", None)
                index = box.count() - 1
            box.setCurrentIndex(index)
            box.blockSignals(False)
        if size is not None and size.size_bytes:
            ends = size.breakdown.get("embedding", 0)
            self.share.setText(f"{ends / 2**20:.2f} MB of the plan's {size.size_mb:.2f} MB "
                               f"({100 * ends / size.size_bytes:.0f}%)")

    def auto_names(self) -> list[str]:
        """The layers of the ends set to auto (`allocate.loss_table(auto=)`)."""
        return [name for end in self.auto for name in end.names]

    def _choices(self):
        return NATIVE_CHOICES if self.native else CHOICES

    def _auto_index(self) -> int:
        return [word for word, _ in self._choices()].index("auto")

    def _spec(self, word, end: End):
        """The word's grid in the plan's method where the end can run it (`in_method`)."""
        if word is None:
            return None
        return in_method(end_spec(word, self.native, "fp16" if self.native else "fp32"), end,
                         self.body)

    def _build(self, ends: list[End], native: bool) -> None:
        while self.row.count():
            widget = self.row.takeAt(0).widget()
            if widget is not None:
                widget.deleteLater()
        if ends != self.ends:
            self.auto = set()
        self.ends, self.native, self.boxes = ends, native, []
        if not ends:
            return
        self.row.addWidget(QLabel("<b>Ends</b>"))
        for end in ends:
            box = QComboBox()
            for word, label in self._choices():
                box.addItem(label, word)
            box.setToolTip(TOOLTIP)
            box.activated.connect(lambda index, e=end, b=box: self._picked(e, b, index))
            self.row.addWidget(QLabel(end.title))
            self.row.addWidget(box)
            self.boxes.append(box)
        self.share = QLabel()
        self.row.addWidget(self.share)
        self.row.addStretch(1)

    def _picked(self, end: End, box: QComboBox, index: int) -> None:
        word = box.itemData(index)
        if word is None and index >= len(self._choices()):
            return   # the custom entry: already the plan's
        if word == "auto":
            if end not in self.auto:
                self.auto.add(end)
                self.auto_changed.emit()
            return
        if end in self.auto:
            self.auto.discard(end)
            self.auto_changed.emit()
        try:
            spec = self._spec(word, end)
        except StudioError:   # (the menus only hold valid words)
            return
        self.chosen.emit(end, spec)


def _grid(spec):
    """A spec's grid, whatever its method: the menu names grids (the method is the plan's)."""
    from studio.core.quant.registry import REFERENCE
    return None if spec is None else spec.with_(method=REFERENCE, options={})
