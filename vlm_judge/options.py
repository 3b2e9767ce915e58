"""The option grammar every command shares: KEY=VALUE pairs, one ConfigError.

`parse_pairs` is the one parser of KEY=VALUE text (backend args, column maps, image rewrites,
recipe overrides); the judge options every judge-loading command takes are built on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A flag, recipe field or option value is invalid; the message names it."""


def parse_pairs(items: Iterable[str] | str | None, flag: str, *, split_commas: bool = False,
                json_values: bool = False, strip: bool = True) -> dict[str, Any]:
    """['k=v', ...] -> {k: v}. `split_commas`: one item may hold 'a=b,c=d'. `json_values`: a value
    that parses as JSON becomes that value (`n=3` -> 3, `x=[1,2]` -> a list), else stays text."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split(",") if split_commas else [item]:
            if strip and not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"{flag} expects KEY=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            k = k.strip()
            if not k:
                raise ConfigError(f"{flag} expects KEY=VALUE, got {part!r} (empty KEY)")
            if strip and split_commas:
                v = v.strip()
            out[k] = json_value(v) if json_values else v
    return out


def json_value(text: str) -> Any:
    """A value given on the command line: JSON when it parses (numbers, booleans, lists), else text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return text


__all__ = ["ConfigError", "json_value", "parse_pairs"]
