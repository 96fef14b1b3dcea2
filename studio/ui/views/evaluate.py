"""Evaluate variants: perplexity on a text, KL and top-1 against the baseline, the text coloured
by how much each token's loss rose, and greedy generations side by side for one prompt."""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from studio.core.evaluate import (
    DEFAULT_PROMPT,
    DEFAULT_SEQLEN,
    DEFAULT_WINDOWS,
    GENERATE_TOKENS,
    evaluate_with_ggufs_job,
    generations_job,
)
from studio.core.backends import gguf_label
from studio.core.runs import BASELINE, describe_baseline, describe_gguf, describe_variant, eval_run
from studio.ui.widgets import GgufFiles, check_item

BUILTIN = "Built-in text (Python help topics)"
BOS_TITLES = {"auto": "As the model's tokenizer asks", "yes": "Always", "no": "Never"}
# Loss change (nats) at which a token's colour saturates.
SATURATION = 3.0


def loss_colour(delta: float) -> str:
    """Red where the loss rose, blue where it fell, white where it stayed."""
    t = max(-1.0, min(1.0, delta / SATURATION))
    fade = int(255 * (1 - abs(t)))
    return f"#ff{fade:02x}{fade:02x}" if t >= 0 else f"#{fade:02x}{fade:02x}ff"


def coloured_html(tokens: list[str], increase: list[float], loss: list[float]) -> str:
    spans = []
    for token, delta, nll in zip(tokens, increase, loss):
        text = html.escape(token).replace("\n", "&#8629;<br>")
        spans.append(f'<span style="background:{loss_colour(delta)}" '
                     f'title="loss {nll:.2f} ({delta:+.2f})">{text}</span>')
    return "<div style='font-family:monospace; white-space:pre-wrap'>" + "".join(spans) + "</div>"


class EvaluateView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.state = state
        self.results: dict[str, object] = {}   # name -> EvalResult of the last run
        self.text_path: str | None = None
        self.ggufs = GgufFiles(state)   # evaluated by llama.cpp beside the torch models

        self.targets = QListWidget()
        self.targets.setMaximumHeight(140)
        self.add_gguf_button = QPushButton("Add GGUF file (llama.cpp)...")
        self.add_gguf_button.clicked.connect(self._choose_gguf)
        self.llama_note = QLabel()
        self.llama_note.setWordWrap(True)
        self.text = QComboBox()
        self.text.addItem(BUILTIN, None)
        self.text.addItem("Choose a text file...", "choose")
        self.text.activated.connect(self._text_chosen)
        self.seqlen = QSpinBox(minimum=16, maximum=8192, value=DEFAULT_SEQLEN, singleStep=64)
        self.windows = QSpinBox(minimum=1, maximum=10_000, value=DEFAULT_WINDOWS)
        # Whether each window starts with BOS (core/text.py): the model's own choice by default.
        self.bos = QComboBox()
        for setting, title in BOS_TITLES.items():
            self.bos.addItem(title, setting)
        self.run_button = QPushButton("Evaluate")
        self.run_button.clicked.connect(self.run_evaluation)
        form = QFormLayout()
        form.addRow("Models", self.targets)
        form.addRow(self.add_gguf_button)
        form.addRow(self.llama_note)
        form.addRow("Text", self.text)
        form.addRow("Window length (tokens)", self.seqlen)
        form.addRow("Windows (at most)", self.windows)
        form.addRow("BOS token per window", self.bos)
        form.addRow(self.run_button)
        self.summary = QLabel("Pick the baseline, variants and/or GGUF files, then Evaluate.")
        self.summary.setWordWrap(True)
        form.addRow(self.summary)

        self.shown = QComboBox()
        self.shown.currentIndexChanged.connect(self._show_tokens)
        self.tokens = QTextBrowser()
        legend = QLabel("First window, each token coloured by how much its loss rose against "
                        "the baseline: <span style='background:#ff8080'>&nbsp;rose&nbsp;</span> "
                        "<span style='background:#8080ff'>&nbsp;fell&nbsp;</span> (saturates at "
                        f"±{SATURATION:g} nats).")
        legend.setWordWrap(True)
        token_box = QWidget()
        token_layout = QVBoxLayout(token_box)
        token_layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(QLabel("Show"))
        row.addWidget(self.shown, 1)
        token_layout.addLayout(row)
        token_layout.addWidget(legend)
        token_layout.addWidget(self.tokens)

        self.prompt = QLineEdit(DEFAULT_PROMPT)
        self.new_tokens = QSpinBox(minimum=1, maximum=512, value=GENERATE_TOKENS)
        self.generate_button = QPushButton("Generate side by side")
        self.generate_button.clicked.connect(self.run_generations)
        gen_row = QHBoxLayout()
        gen_row.addWidget(QLabel("Prompt"))
        gen_row.addWidget(self.prompt, 1)
        gen_row.addWidget(QLabel("new tokens"))
        gen_row.addWidget(self.new_tokens)
        gen_row.addWidget(self.generate_button)
        self.generations = QWidget()
        self.generations_layout = QHBoxLayout(self.generations)
        self.generations_layout.setContentsMargins(0, 0, 0, 0)
        gen_box = QWidget()
        gen_layout = QVBoxLayout(gen_box)
        gen_layout.setContentsMargins(0, 0, 0, 0)
        gen_layout.addLayout(gen_row)
        gen_layout.addWidget(self.generations, 1)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.addLayout(form)
        left_layout.addStretch(1)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(token_box)
        right.addWidget(gen_box)
        right.setSizes([500, 300])
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([380, 1000])
        layout = QVBoxLayout(self)
        layout.addWidget(split)

        state.modelChanged.connect(lambda _h: self._model_changed())
        state.resultsChanged.connect(lambda key: key == "variants" and self._fill_targets())
        self._model_changed()

    # --- choices ---------------------------------------------------------------------------
    def _model_changed(self) -> None:
        self.results.clear()
        self.shown.clear()
        self.tokens.clear()
        self._fill_targets()
        ready = self.state.handle is not None and self.state.handle.text_ready
        self.run_button.setEnabled(ready)
        self.generate_button.setEnabled(ready)
        if self.state.handle is not None and not ready:
            self.summary.setText("This model has no tokenizer: evaluation needs one.")

    def _fill_targets(self) -> None:
        checked = set(self.checked_names()) or {BASELINE}
        self.targets.clear()
        if self.state.handle is None:
            return
        for name in [BASELINE, *self.state.session.variants]:
            self.targets.addItem(check_item(name, name, name in checked))
        for item in self.ggufs.items(checked):
            self.targets.addItem(item)
        self.llama_note.setText(self.ggufs.note("the same windows, against the same baseline"))

    def checked_names(self) -> list[str]:
        """The ticked entries: model names (the baseline, variants) and "gguf:PATH" keys."""
        return [self.targets.item(i).data(Qt.ItemDataRole.UserRole)
                for i in range(self.targets.count())
                if self.targets.item(i).checkState() == Qt.CheckState.Checked]

    def set_checked(self, names: list[str]) -> None:
        for i in range(self.targets.count()):
            item = self.targets.item(i)
            item.setCheckState(Qt.CheckState.Checked
                               if item.data(Qt.ItemDataRole.UserRole) in names
                               else Qt.CheckState.Unchecked)

    def add_gguf(self, path) -> None:
        self.ggufs.added.append(Path(path))
        self._fill_targets()
        self.set_checked(self.checked_names() + [GgufFiles.PREFIX + str(Path(path))])

    def _choose_gguf(self) -> None:
        path = self.ggufs.choose(self, "evaluate")
        if path:
            self.add_gguf(path)

    def _checked_ggufs(self) -> list[Path]:
        return [p for p in map(GgufFiles.path_of, self.checked_names()) if p is not None]

    def _text_chosen(self) -> None:
        if self.text.currentData() != "choose":
            self.text_path = self.text.currentData()
            return
        path, _ = QFileDialog.getOpenFileName(self, "Evaluation text", "", "Text (*.txt);;All (*)")
        if path:
            self.set_text_file(path)
        else:
            self.text.setCurrentIndex(0)

    def set_text_file(self, path: str) -> None:
        self.text.insertItem(self.text.count() - 1, path, path)
        self.text.setCurrentIndex(self.text.count() - 2)
        self.text_path = path

    def _models(self) -> dict[str, object]:
        handle = self.state.handle
        variants = self.state.session.variants
        return {name: handle.model if name == BASELINE else variants[name].model
                for name in self.checked_names() if name == BASELINE or name in variants}

    # --- evaluation ------------------------------------------------------------------------
    def run_evaluation(self):
        models, ggufs = self._models(), self._checked_ggufs()
        if not models and not ggufs:
            self.summary.setText("Tick at least one model to evaluate.")
            return None
        handle = self.state.handle
        path, seqlen, windows = self.text_path, self.seqlen.value(), self.windows.value()
        bos = self.bos.currentData()

        self.summary.setText("Evaluating...")
        files = {gguf_label(p): p for p in ggufs}
        return self.state.submit(
            "Evaluate", lambda: evaluate_with_ggufs_job(models, ggufs, handle.model,
                                                        handle.tokenizer, path, seqlen,
                                                        windows, bos=bos),
            on_result=lambda results: self._evaluated(results, path, files))

    def _evaluated(self, results: dict, text_path: str | None = None,
                   files: dict | None = None) -> None:
        handle = self.state.handle
        files = files or {}
        runs = []
        for name, result in results.items():
            what = (describe_baseline(handle) if name == BASELINE
                    else describe_gguf(files[name]) if name in files
                    else describe_variant(self.state.session.variants[name]))
            runs.append(eval_run(what, result, text_path))
            self.results[name] = result
        self.state.add_runs(runs)
        lines = [f"<b>{name}</b>: perplexity {r.ppl:.3f}, KL {r.kl:.4f}, top-1 {r.top1:.1%}"
                 for name, r in results.items()]
        first = next(iter(results.values()))
        lines.append(f"{first.text}: {first.windows} windows x {first.seqlen} tokens "
                     f"({first.tokens} predicted tokens), "
                     + (f"each starting with BOS {first.bos}." if first.bos else "no BOS."))
        self.summary.setText("<br>".join(lines))
        current = self.shown.currentText()
        self.shown.blockSignals(True)
        self.shown.clear()
        self.shown.addItems(list(self.results))
        self.shown.blockSignals(False)
        index = self.shown.findText(current)
        self.shown.setCurrentIndex(index if index >= 0 else self.shown.count() - 1)
        self._show_tokens()

    def _show_tokens(self) -> None:
        result = self.results.get(self.shown.currentText())
        if result is None or result.token_losses is None:
            self.tokens.clear()
            return
        losses = result.token_losses
        self.tokens.setHtml(coloured_html(losses.tokens, losses.increase, losses.loss))

    # --- generations -----------------------------------------------------------------------
    def run_generations(self):
        models = self._models()
        if not models:
            return None
        handle, prompt, count = self.state.handle, self.prompt.text(), self.new_tokens.value()
        return self.state.submit("Generate", lambda: generations_job(models, handle.tokenizer,
                                                                     prompt, count),
                                 on_result=lambda texts: self._show_generations(prompt, texts))

    def _show_generations(self, prompt: str, texts: dict[str, str]) -> None:
        while self.generations_layout.count():
            self.generations_layout.takeAt(0).widget().deleteLater()
        for name, text in texts.items():
            box = QWidget()
            box_layout = QVBoxLayout(box)
            box_layout.setContentsMargins(0, 0, 0, 0)
            box_layout.addWidget(QLabel(f"<b>{html.escape(name)}</b>"))
            edit = QPlainTextEdit(prompt + text)
            edit.setReadOnly(True)
            box_layout.addWidget(edit)
            self.generations_layout.addWidget(box)
