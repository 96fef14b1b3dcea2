"""Whether a value has the type a dataclass field declares, containers' items included.

Result types (statistics, sensitivity results...) trust their callers; when one is rebuilt from
a file that came from anywhere (a session, a sensitivity file), its fields are checked against
their declarations first, so a wrong type is refused on loading rather than failing in a view.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def fits(value: Any, hint: Any) -> bool:
    if hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(fits(k, args[0]) and fits(v, args[1])
                                               for k, v in value.items())
    return isinstance(value, origin or hint)


def wrong_fields(cls: type, values: dict[str, Any]) -> list[str]:
    """The names in `values` whose value does not fit `cls`'s declaration of that field."""
    hints = typing.get_type_hints(cls)
    return [name for name, value in values.items() if not fits(value, hints.get(name, Any))]


def check_dataclass(obj: Any) -> list[str]:
    return wrong_fields(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
