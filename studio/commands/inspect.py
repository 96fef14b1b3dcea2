"""compression-studio inspect MODEL [--json]: the layer inventory."""
from __future__ import annotations

from studio.commands.common import add_model_argument, open_model, print_json

NAME = "inspect"
HELP = "print a model's quantizable layers (name, role, shape, parameters, bytes)"


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from studio.core.layers import embedding_summary
    from studio.core.text import bos_label, bos_token

    handle = open_model(args.model)
    embedding = embedding_summary(handle.layers, handle.param_count)
    bos = bos_label(handle.tokenizer, bos_token(handle.tokenizer, "auto"))
    if args.json:
        print_json({
            "model": handle.source, "architecture": handle.architecture,
            "model_type": handle.model_type, "params": handle.param_count,
            "size_bytes": handle.size_bytes, "tokenizer": handle.text_ready,
            "embedding": embedding, "bos": bos,
            "notes": handle.notes, "load_seconds": round(handle.load_seconds, 3),
            "layers": [layer.to_dict() for layer in handle.layers],
        })
        return 0
    print(f"{handle.name}: {handle.architecture}, {handle.param_count / 1e6:.1f}M parameters, "
          f"{handle.size_bytes / 2**20:.1f} MiB")
    if embedding is not None:
        head = ("the lm_head is tied to it (one weight, used at both ends)"
                if embedding["lm_head_tied"] else
                f"the lm_head ({embedding['lm_head']}) has its own weight"
                if embedding["lm_head"] else "no lm_head")
        print(f"embedding {embedding['embedding']}: {embedding['vocab']:,} tokens, "
              f"{embedding['params'] / 1e6:.1f}M parameters = {100 * embedding['share']:.1f}% "
              f"of the model; {head}")
    if handle.text_ready:
        print(f"text windows start with BOS {bos} (the tokenizer adds it)" if bos else
              "text windows start with no BOS (the tokenizer adds none)")
    for note in handle.notes:
        print(f"note: {note}")
    width = max(len(layer.name) for layer in handle.layers)
    print(f"{'layer':<{width}}  {'block':>5}  {'role':<9} {'shape':>13}  {'params':>11}  quant")
    for layer in handle.layers:
        shape = "x".join(str(d) for d in layer.shape)
        block = "" if layer.block is None else layer.block
        mark = "yes" if layer.quantizable else f"no ({layer.kind})"
        print(f"{layer.name:<{width}}  {block:>5}  {layer.role:<9} {shape:>13}  "
              f"{layer.params:>11,}  {mark}")
    return 0
