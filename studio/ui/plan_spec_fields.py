"""The fields a plan edit is made of: bits, group size, method, symmetric, skip, and the
GGUF-native switch that fixes the grid to what a llama.cpp type holds exactly."""
from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QComboBox, QSpinBox

from studio.core.errors import StudioError
from studio.core.export.gguf_types import BLOCK
from studio.core.plan import GROUP_SIZES, QuantSpec
from studio.core.plan_rules import NOT_NATIVE
from studio.core.quant import registry
from studio.core.quant.grid import native_gguf_type
from studio.ui.widgets import method_tooltips


class SpecFields:
    """The widgets (laid out by the view) and the spec they make."""

    def __init__(self) -> None:
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

    def fix_native_grid(self, native: bool) -> None:
        """GGUF-native fixes the grid (group 32, symmetric, fp16 scales): only the width is
        chosen by hand."""
        if native:
            self.group.setCurrentIndex(self.group.findData(BLOCK))
            self.symmetric.setChecked(True)
        self.group.setEnabled(not native)
        self.symmetric.setEnabled(not native)

    def spec(self) -> QuantSpec | None:
        """The edited spec (None: keep 16-bit); a StudioError when GGUF-native is on and the
        spec is no GGUF type."""
        if self.skip.isChecked():
            return None
        native = self.gguf_native.isChecked()
        spec = QuantSpec(bits=self.bits.value(), group_size=self.group.currentData(),
                         symmetric=self.symmetric.isChecked(), method=self.method.currentText(),
                         scale_dtype="fp16" if native else "fp32")
        if native and native_gguf_type(spec) is None:
            raise StudioError(NOT_NATIVE)
        return spec
