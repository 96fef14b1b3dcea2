"""Third-party extensions, found through the `compression_studio.plugins` entry-point group.

A plugin package declares, in its own pyproject.toml,

    [project.entry-points."compression_studio.plugins"]
    my_plugin = "my_package:plugin"

where `plugin` is a dict with any of:
    "views":    [(tab title, "module:Class"), ...]   Qt views, built like the studio's own
    "commands": ["module", ...]                      CLI sub-command modules (NAME, HELP,
                                                     add_arguments, run), like studio/commands/*
A plugin that fails to load is reported and skipped; it never stops the studio.
Quantization methods have their own group, `compression_studio.quantizers`
(`studio.core.quant.registry`); its failures are reported here too, so the window's one
plugin-error path shows them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points

log = logging.getLogger(__name__)
GROUP = "compression_studio.plugins"


@dataclass
class Plugins:
    views: list[tuple[str, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one sentence per plugin that failed


def discover() -> Plugins:
    found = Plugins()
    for point in entry_points(group=GROUP):
        try:
            spec = point.load()
            if not isinstance(spec, dict):
                raise TypeError(f"{point.value} is a {type(spec).__name__}, not a dict")
            views = [(str(title), str(target)) for title, target in spec.get("views", [])]
            commands = [str(module) for module in spec.get("commands", [])]
        except Exception as exc:  # a broken plugin is the plugin's problem, not the user's
            found.errors.append(f"Plugin {point.name!r} could not be loaded: {exc}")
            log.warning("plugin %s failed: %s", point.name, exc)
            continue
        found.views.extend(views)
        found.commands.extend(commands)
    from studio.core.quant import registry
    found.errors.extend(registry.plugin_errors())
    return found
