"""The card itself: a few lines a person reads first, from the config and the inventory."""
from __future__ import annotations


def model_card(handle) -> list[tuple[str, str]]:
    config = handle.model.config
    fields = [("Model", handle.name), ("Architecture", handle.architecture),
              ("Parameters", f"{handle.param_count:,}"),
              ("Size in memory", f"{handle.size_bytes / 2**20:,.1f} MiB"),
              ("Blocks", str(len({i.block for i in handle.quantizable}))),
              ("Quantizable layers", str(len(handle.quantizable)))]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        if getattr(config, key, None) is not None:
            fields.append((key, str(getattr(config, key))))
    fields.append(("Tokenizer", "yes" if handle.text_ready else "none"))
    return fields
