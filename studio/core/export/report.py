"""README.md beside every export: what the folder holds, how to load it, and its figures."""
from __future__ import annotations

from pathlib import Path


def readme_text(fmt, variant, report: dict) -> str:
    file = Path(report["file"]).name if report["file"] != report["path"] else "."
    lines = [
        f"# {variant.name} ({fmt.title})",
        "",
        f"Exported by Compression Studio {report['studio_version']} from "
        f"`{variant.base_source}` ({variant.architecture}).",
        "",
        "## Load it",
        "```",
        fmt.usage(file),
        "```",
        "",
        "## Figures",
        f"- size of the model files: {report['bytes'] / 2**20:.2f} MiB",
        f"- bits per weight on disk: {report['bits_per_weight_on_disk']:.3f} "
        f"(the studio's estimate for the variant: {report['bits_per_weight_estimate']:.3f})",
        f"- verified by re-opening with {fmt.consumer}: "
        f"max weight difference {report['max_weight_diff']:.3g} in the quantized layers "
        f"({report['max_float_diff']:.3g} in the other tensors), "
        f"max logit difference {report['max_logit_diff']:.3g} "
        f"(logits from {report.get('logits_by') or fmt.consumer}), "
        f"top-1 agreement {report['top1_agreement']:.2%}, "
        f"tokenizer {report['tokenizer_detail']}",
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        lines.append(f"- perplexity of this file {evaluation['ppl_export']:.4f}, of the variant in "
                     f"the studio {evaluation['ppl_variant']:.4f} ({evaluation['protocol']}, "
                     f"{evaluation['windows']} x {evaluation['seqlen']} tokens)")
    lines.append(f"- export time {report['seconds']:.1f} s (writing, re-opening, verifying)")
    for key, value in (report.get("metrics") or {}).items():
        lines.append(f"- {key}: {value}")
    inexact = [layer for layer in report["layers"] if not layer["exact"]]
    lines += ["", "## Layers",
              f"{len(report['layers'])} quantized layers; "
              + (f"{len(inexact)} not stored exactly (see report.json)." if inexact
                 else "every one stored exactly as the studio made it.")]
    if report["notes"]:
        lines += ["", "## Notes"] + [f"- {note}" for note in report["notes"]]
    lines += ["", "`recipe.json` holds the plan; `report.json` every figure above, per layer.", ""]
    return "\n".join(lines)
