"""Benchmark the baseline and variants on this CPU: prefill, decode speed, memory, size, and
the kernel that ran each layer (fallbacks listed with their reason); GGUF files (the model's
own, any file added) through llama.cpp beside them, when its binding is installed."""
from __future__ import annotations

from pathlib import Path

import torch
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.bench import (BASE_CONFIGS, base_targets, bench_job, gguf_target,
                               variant_bench_target)
from studio.core.errors import StudioError
from studio.core.runs import bench_run, describe_baseline, describe_gguf, describe_variant
from studio.ui.widgets import GgufFiles, check_item

RESULT_COLUMNS = ("Configuration", "Prefill ms (min-max)", "Decode tok/s (min-max)",
                  "Weights/token MB", "Size MB", "Peak RSS MB", "Threads", "Kernels",
                  "Backend (build)")
KERNEL_COLUMNS = ("Layer", "Kernel", "Bits", "Weight KB", "Note")
KERNEL_CHOICES = {"native": "the studio's (C, int8 activations)",
                  "torch": "torch's int4pack / int8pack", "native,torch": "both, side by side"}
CONFIG_LABELS = {"fp32": "baseline fp32", "bf16": "baseline bf16",
                 "int8": "baseline int8 (RTN, for speed)", "int4": "baseline int4 g32 (RTN, for speed)"}


class BenchmarkView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.results: list = []
        self.ggufs = GgufFiles(state)   # run through llama.cpp beside the torch targets

        self.targets = QListWidget()
        self.prompt_tokens = QSpinBox(minimum=1, maximum=4096, value=128)
        self.new_tokens = QSpinBox(minimum=1, maximum=1024, value=64)
        self.repeat = QSpinBox(minimum=1, maximum=20, value=3)
        self.threads = QSpinBox(minimum=1, maximum=max(1, torch.get_num_threads() * 2),
                                value=torch.get_num_threads())
        self.kernel_set = QComboBox()
        for key, label in KERNEL_CHOICES.items():
            self.kernel_set.addItem(label, key)
        self.compile = QCheckBox("Compile the decode step (torch.compile; minutes, once per "
                                 "model and length)")
        self.add_gguf_button = QPushButton("Add GGUF file (llama.cpp)...")
        self.add_gguf_button.clicked.connect(self._choose_gguf)
        self.run_button = QPushButton("Run benchmark")
        self.run_button.clicked.connect(self.run_benchmark)
        self.targets.setMaximumHeight(170)
        form = QFormLayout()
        form.addRow(QLabel("Measure"))
        form.addRow(self.targets)
        form.addRow(self.add_gguf_button)
        self.llama_note = QLabel()
        self.llama_note.setWordWrap(True)
        form.addRow(self.llama_note)
        form.addRow("Prompt tokens (prefill)", self.prompt_tokens)
        form.addRow("New tokens (decode, batch 1)", self.new_tokens)
        form.addRow("Repeats (after a warm-up)", self.repeat)
        form.addRow("Threads", self.threads)
        form.addRow("Low-bit kernels", self.kernel_set)
        form.addRow(self.compile)
        form.addRow(self.run_button)
        self.summary = QLabel("Tick what to measure. Quantized variants run on low-bit CPU "
                              "kernels (chosen above); layers no kernel takes run de-quantized, "
                              "and the kernels table says why.")
        self.summary.setWordWrap(True)
        form.addRow(self.summary)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.addLayout(form)
        left_layout.addStretch(1)

        self.table = self._table(RESULT_COLUMNS)
        self.table.currentCellChanged.connect(lambda row, *_: self._show_kernels(row))
        self.kernels = self._table(KERNEL_COLUMNS)
        self.kernel_title = QLabel("Kernels per layer: select a row above.")
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.table, 2)
        right_layout.addWidget(self.kernel_title)
        right_layout.addWidget(self.kernels, 3)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([400, 1000])
        layout = QHBoxLayout(self)
        layout.addWidget(split)

        state.modelChanged.connect(lambda _h: self._fill_targets())
        state.resultsChanged.connect(lambda key: key == "variants" and self._fill_targets())
        self._fill_targets()

    @staticmethod
    def _table(columns) -> QTableWidget:
        table = QTableWidget(0, len(columns))
        table.setHorizontalHeaderLabels(columns)
        table.verticalHeader().setVisible(False)
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        table.verticalHeader().setDefaultSectionSize(22)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        table.horizontalHeader().setStretchLastSection(True)
        return table

    # --- choices ---------------------------------------------------------------------------
    def _fill_targets(self) -> None:
        checked = set(self.checked_keys()) or {"fp32"}
        self.targets.clear()
        if self.state.handle is None:
            self.run_button.setEnabled(False)
            return
        self.run_button.setEnabled(True)
        entries = [(config, CONFIG_LABELS[config]) for config in BASE_CONFIGS]
        entries += [(f"variant:{name}", f"variant {name}") for name in self.state.session.variants]
        for key, label in entries:
            self.targets.addItem(check_item(key, label, key in checked))
        for item in self.ggufs.items(checked):
            self.targets.addItem(item)
        self.llama_note.setText(self.ggufs.note("the same prompt, lengths and threads"))

    def add_gguf(self, path) -> None:
        self.ggufs.added.append(Path(path))
        self._fill_targets()
        self.set_checked(self.checked_keys() + [GgufFiles.PREFIX + str(Path(path))])

    def _choose_gguf(self) -> None:
        path = self.ggufs.choose(self, "benchmark")
        if path:
            self.add_gguf(path)

    def checked_keys(self) -> list[str]:
        return [self.targets.item(i).data(Qt.ItemDataRole.UserRole)
                for i in range(self.targets.count())
                if self.targets.item(i).checkState() == Qt.CheckState.Checked]

    def set_checked(self, keys: list[str]) -> None:
        for i in range(self.targets.count()):
            item = self.targets.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.data(Qt.ItemDataRole.UserRole) in keys
                               else Qt.CheckState.Unchecked)

    # --- running ---------------------------------------------------------------------------
    def run_benchmark(self):
        handle = self.state.handle
        keys = self.checked_keys()
        if handle is None or not keys:
            self.summary.setText("Tick at least one configuration or variant.")
            return None
        configs = [k for k in BASE_CONFIGS if k in keys]
        kernels = self.kernel_set.currentData().split(",")
        names = [layer.name for layer in handle.quantizable]
        try:   # refused before any work: e.g. a streamed model (bench.refuse_streamed)
            targets = base_targets(handle.model, configs, layer_names=names, kernels=kernels[0])
            quantized = [c for c in configs if c in ("int8", "int4")]
            if quantized:
                for kernel in kernels[1:]:
                    targets += base_targets(handle.model, quantized, layer_names=names,
                                            kernels=kernel)
            owners = {t.name: None for t in targets}   # target name -> variant (None: baseline)
            for key in keys:
                if key.startswith("variant:"):
                    variant = self.state.session.variants[key.split(":", 1)[1]]
                    for kernel in kernels:   # sized as everywhere: its size_breakdown
                        targets.append(variant_bench_target(variant, kernels=kernel))
                        owners[targets[-1].name] = variant
                elif GgufFiles.path_of(key):
                    targets.append(gguf_target(GgufFiles.path_of(key)))
        except StudioError as exc:
            self.summary.setText(str(exc))
            return None
        vocab = handle.model.get_input_embeddings().weight.shape[0]
        settings = (self.prompt_tokens.value(), self.new_tokens.value(), self.repeat.value(),
                    self.threads.value())
        self.summary.setText("Benchmarking... (other work on this machine skews the figures)")
        compile_step = self.compile.isChecked()
        return self.state.submit(
            "Benchmark", lambda: bench_job(targets, vocab, *settings, compile=compile_step),
            on_result=lambda results: self._measured(results, owners))

    def _measured(self, results: list, owners: dict) -> None:
        handle = self.state.handle
        self.results = results
        runs = []
        for result in results:
            if result.error:      # no figures: its row says why
                continue
            variant = owners.get(result.name)
            data = result.to_dict()
            if variant is not None:   # on another int4 kernel: a row of its own in Compare
                what = {**describe_variant(variant), "variant": result.name}
            elif result.name == "fp32":
                what = describe_baseline(handle)
            elif result.backend != "torch":
                what = describe_gguf(result.details["gguf"])
            else:  # bf16 / int8 / int4 speed configurations of the baseline
                what = {"variant": result.name.replace(" + lm_head", "+head"),
                        "plan": data.get("quantized", result.name),
                        "size_mb": result.size_mb}
            runs.append(bench_run(what, result))
        if runs:
            self.state.add_runs(runs)
        self._fill_table()
        failed = [r for r in results if r.error]
        fallbacks = sum(len(r.fallbacks) for r in results)
        self.summary.setText(f"Measured {len(results)} configurations with "
                             f"{results[0].threads} thread(s)."
                             + (f" {fallbacks} layers fell back to fp32 dense (see the kernels "
                                f"table)." if fallbacks else "")
                             + "".join(f" {r.name}: {r.error}" for r in failed))

    def _fill_table(self) -> None:
        self.table.setRowCount(len(self.results))
        for row, r in enumerate(self.results):
            data = r.to_dict()
            build = ", ".join(f"{v}" for k, v in r.build.items() if k not in ("backend", "threads"))
            if r.error:
                values = (r.name, "", "", "", "", "", str(r.threads), f"no figures: {r.error}",
                          r.backend)
                for col, value in enumerate(values):
                    self.table.setItem(row, col, QTableWidgetItem(value))
                continue
            values = (r.name,
                      f"{r.prefill_ms:.1f} ({r.prefill_ms_range[0]:.1f}-{r.prefill_ms_range[1]:.1f})",
                      f"{r.decode_tok_s:.1f} ({r.decode_tok_s_range[0]:.1f}-"
                      f"{r.decode_tok_s_range[1]:.1f})",
                      f"{r.weights_read_mb:.1f}", f"{r.size_mb:.1f}", f"{r.peak_rss_mb:.0f}",
                      str(r.threads),
                      ", ".join(f"{k} x{n}" for k, n in data["kernel_summary"].items()),
                      f"{r.backend} ({build})"
                      + (f"; decode step {r.details['decode_step']}"
                         if r.details.get("decode_step") else ""))
            for col, value in enumerate(values):
                self.table.setItem(row, col, QTableWidgetItem(value))
        if self.results:
            self.table.selectRow(0)
            self._show_kernels(0)

    def _show_kernels(self, row: int) -> None:
        if not 0 <= row < len(self.results):
            return
        result = self.results[row]
        self.kernel_title.setText(f"Kernels per layer: {result.name} "
                                  f"({len(result.fallbacks)} fallbacks)")
        self.kernels.setRowCount(len(result.kernels))
        for i, k in enumerate(result.kernels):
            values = (k.layer, k.kernel, "" if k.bits is None else str(k.bits),
                      f"{k.weight_bytes / 1024:.0f}", k.note)
            for col, value in enumerate(values):
                item = QTableWidgetItem(value)
                if k.fallback:
                    item.setBackground(Qt.GlobalColor.yellow)
                self.kernels.setItem(i, col, item)
