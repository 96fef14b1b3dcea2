"""An example plugin: what the model's own config says, as a tab and as `compression-studio card`.

Install it next to the studio with `pip install -e plugins/studio-model-card`.
"""
plugin = {
    "views": [("Model card", "studio_model_card.view:ModelCardView")],
    "commands": ["studio_model_card.command"],
}
