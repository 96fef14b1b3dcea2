"""compression-studio card MODEL: the model card on the terminal."""
from studio.commands.common import add_model_argument, open_model

from studio_model_card.card import model_card

NAME = "card"
HELP = "print a short model card (example plugin)"


def add_arguments(parser) -> None:
    add_model_argument(parser)


def run(args) -> int:
    for key, value in model_card(open_model(args.model, quiet=True)):
        print(f"{key:<24} {value}")
    return 0
