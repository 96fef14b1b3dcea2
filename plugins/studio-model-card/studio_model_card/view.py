"""The Model card tab."""
from PySide6.QtWidgets import QFormLayout, QLabel, QVBoxLayout, QWidget

from studio_model_card.card import model_card


class ModelCardView(QWidget):
    def __init__(self, state) -> None:
        super().__init__()
        self.form = QFormLayout()
        layout = QVBoxLayout(self)
        layout.addLayout(self.form)
        layout.addStretch(1)
        state.modelChanged.connect(self.show_model)
        if state.handle is not None:
            self.show_model(state.handle)

    def show_model(self, handle) -> None:
        while self.form.rowCount():
            self.form.removeRow(0)
        if handle is not None:
            for key, value in model_card(handle):
                self.form.addRow(f"{key}:", QLabel(value))
