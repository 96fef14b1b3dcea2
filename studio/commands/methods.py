"""compression-studio methods [--json]: the quantization methods this studio knows (built-in and
plug-ins), their options with ranges and help, and the plug-ins that failed to load."""
from __future__ import annotations

from studio.commands.common import print_json
from studio.core.quant import formats, registry

NAME = "methods"
HELP = "list the quantization methods (plug-ins included), their options and plug-in errors"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    methods = [describe(q) for q in registry.all_quantizers()]
    errors = registry.plugin_errors()
    if args.json:
        print_json({"methods": methods, "plugin_errors": errors})
        return 0
    for m in methods:
        print(f"{m['name']:<12} {m['title']} — {m['summary']}")
        print(f"{'':<12} calibration: {m['calibration']}; codes: {m['code_format']}; bits "
              f"{','.join(map(str, m['bits']))}; {m['origin']}")
        for o in m["options"]:
            print(f"{'':<14}--opt {o['name']}=… ({o['range']}, default {o['default']!r})"
                  f"{': ' + o['help'] if o['help'] else ''}")
    for error in errors:
        print(f"plug-in error: {error}")
    return 0


def describe(q: registry.Quantizer) -> dict:
    fmt = formats.get(q.code_format)
    return {"name": q.name, "title": q.title, "summary": q.summary,
            "calibration": q.calibration + (" + smoothing from the float model's activations"
                                            if q.smoothing else ""),
            "code_format": q.code_format, "bits": list(q.bits),
            "kernels": list(fmt.kernels), "exports": list(fmt.exports), "origin": q.origin,
            "options": [{"name": o.name, "type": o.kind.__name__, "default": o.default,
                         "range": o.describe(), "help": o.help} for o in q.option_infos]}
