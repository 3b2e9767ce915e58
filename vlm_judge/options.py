"""The option grammar every command shares: KEY=VALUE pairs, recipe overrides, one path rule for
recipes, one ConfigError.

`parse_pairs` is the one parser of KEY=VALUE text (backend args, column maps, image rewrites);
`parse_overrides` the one parser of recipe overrides (`a.b=v` or `--a.b v`), `set_dotted` applies
one to a nested mapping, and `recipe_path` is the one rule for paths written in a recipe (relative
to the recipe file). The judge options every judge-loading command takes (`vlm_judge.judge_options`)
are built on these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A flag, recipe field or option value is invalid; the message names it."""


def parse_pairs(items: Iterable[str] | str | None, flag: str, *, split_commas: bool = False,
                json_values: bool = False, strip: bool = True,
                value: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """['k=v', ...] -> {k: v}. `split_commas`: one item may hold 'a=b,c=d'. `json_values`: a value
    that parses as JSON becomes that value (`n=3` -> 3, `x=[1,2]` -> a list), else stays text.
    `value`: another conversion of the value text (e.g. `yaml_value`)."""
    convert = value or (json_value if json_values else None)
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
            out[k] = convert(v) if convert else v
    return out


def json_value(text: str) -> Any:
    """A value given on the command line: JSON when it parses (numbers, booleans, lists), else text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return text


def yaml_value(text: str) -> Any:
    """A recipe override's value: YAML when it parses (`3`, `true`, `[a, b]`, `null`), else text."""
    import yaml

    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: Sequence[str], switches: Iterable[str] = ()) -> tuple[dict[str, str], set[str]]:
    """Recipe overrides as given on a command line -> ({dotted key: value text}, switches seen).

    Both spellings are accepted: `key.sub=VALUE` and `--key.sub VALUE` / `--key.sub=VALUE`; dashes in
    a key become underscores (`--lora-r` is `lora_r`). A `--NAME` listed in `switches` takes no value.
    Values stay text: each config types them (by field type, or with `yaml_value`)."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    allowed = set(switches)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a.startswith("--"):
            key = a[2:]
            if key in allowed:
                seen.add(key)
                continue
            if "=" in key:
                key, val = key.split("=", 1)
            elif i < len(args):
                val = args[i]
                i += 1
            else:
                raise ConfigError(f"flag --{key} needs a value")
        elif "=" in a:
            key, val = a.split("=", 1)
        else:
            raise ConfigError(f"override must be KEY=VALUE or --KEY VALUE (e.g. teacher.model=my-vlm), got {a!r}")
        key = key.strip().replace("-", "_")
        if not key or key.startswith(".") or key.endswith(".") or ".." in key:
            raise ConfigError(f"override {a!r}: empty field name")
        out[key] = val
    return out, seen


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping; a section or field that does not exist is an error naming it."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"override {key!r}: unknown field {parts[-1]!r}; known: {sorted(node)}")
    node[parts[-1]] = value


def shipped_recipes(folder: Path) -> dict[str, Path]:
    """Name -> path of the recipes shipped in `folder` (each command keeps its own folder)."""
    return {p.stem: p for p in sorted(Path(folder).glob("*.yaml"))}


def resolve_recipe(name_or_path: str, folder: Path) -> Path:
    """A recipe file, or the name of a recipe shipped in `folder` (with or without .yaml); a
    name with a folder part is always a path."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    shipped = shipped_recipes(folder)
    if len(p.parts) == 1 and stem in shipped:
        return shipped[stem]
    raise ConfigError(f"recipe not found: {name_or_path} (shipped recipes: {', '.join(shipped) or 'none'})")


def recipe_path(value: str, recipe_dir: str | Path, model_name: bool = False) -> str:
    """The one rule for a path written in a recipe: relative to the recipe file's folder, so a
    recipe means the same thing from any working directory (flags on the command line stay
    relative to the working directory, like every other command-line path).

    `model_name`: the value may also be a hub name ('org/model'): it stays as written unless the
    recipe-relative path exists or it starts with '.'."""
    if "://" in value:
        return value
    if value.startswith(("/", "~")):
        return str(Path(value).expanduser())
    candidate = Path(recipe_dir) / value
    if model_name and not (candidate.exists() or value.startswith(".")):
        return value
    return str(candidate)


def output_problem(path: str | Path, folder: bool, name: str = "out") -> str | None:
    """Why an output cannot be written where a flag or recipe field `name` says, or None: a file
    output that is a folder, a folder output that is a file, or either lying under a file.
    Checked before any model loads, so a typo costs one line, not a traceback after minutes."""
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        return f"{name}: {p} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}"
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{name}: {p} lies under {parent}, which is a file"
    return None


__all__ = ["output_problem", "ConfigError", "json_value", "parse_overrides", "parse_pairs", "recipe_path", "set_dotted", "yaml_value"]
