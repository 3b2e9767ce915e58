"""`vlm-judge data build RECIPE.yaml [--out DIR] [--limit N] [KEY=VALUE ...]`: build judge data.

RECIPE is a YAML file (a saved BuildConfig) or the name of a shipped recipe (`vlm-judge data
recipes` lists them). Dotted KEY=VALUE arguments override recipe fields, e.g.
`teacher.base_url=http://gpu-box:8000/v1 counts.rubrics_per_image=3`.

Exit status: 0 when the build finished, 1 when it produced no example or failed on the way
(the reason is printed; a re-run resumes), 2 for a bad recipe or command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from perception_collection.config import BuildConfig, ConfigError
from vlm_judge import options
from vlm_judge.options import output_problem

RECIPES_DIR = Path(__file__).parent / "recipes"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of the data-builder recipes that ship with the package."""
    return options.shipped_recipes(RECIPES_DIR)


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file, or the name of a shipped recipe (vlm_judge.options.resolve_recipe)."""
    return options.resolve_recipe(name_or_path, RECIPES_DIR)


def describe_recipe(path: Path) -> str:
    """A shipped recipe's one-line description: the first comment line of its file."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


# ---- checks made before anything is read or loaded --------------------------------------------


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    if cls is BuildConfig:  # `filters` is typed Any so that config does not import the filters module
        from perception_collection.filters import FilterConfig

        hints["filters"] = FilterConfig | None
    return hints


def _accepts(t: Any, v: Any) -> bool:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in args)
    if origin is typing.Literal:
        return v in args
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    if t is list or origin is list:  # a single string may stand for a one-item list (export: jsonl)
        return isinstance(v, (list, str))
    if t is dict or origin is dict:  # a mapping field may also be KEY=VALUE,... text (backend_args)
        return isinstance(v, (dict, str))
    if dataclasses.is_dataclass(t):
        return isinstance(v, dict)
    return True


def _type_name(t: Any) -> str:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if t is type(None):
        return "null"
    if dataclasses.is_dataclass(t):
        return "a mapping"
    return getattr(t, "__name__", None) or str(t)


def type_problems(cls: type, d: Any, where: str = "") -> list[str]:
    """Fields of a recipe mapping whose value has the wrong type, each as 'field must be T, got V'
    (said before the dataclass compares a string with a number and fails with a TypeError)."""
    if not isinstance(d, dict):
        return []
    hints = _section_types(cls)
    out = []
    for key, value in d.items():
        if key not in hints:
            continue  # unknown fields are the config's to name
        t = hints[key]
        name = f"{where}{key}"
        if not _accepts(t, value):
            out.append(f"{name} must be {_type_name(t)}, got {value!r}")
            continue
        sub = [a for a in (typing.get_args(t) or (t,)) if dataclasses.is_dataclass(a)]
        if sub and isinstance(value, dict):
            out += type_problems(sub[0], value, f"{name}.")
    return out


def _with_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The recipe mapping with dotted KEY=VALUE overrides set (only to check their types; the
    config applies them itself)."""
    from vlm_judge.options import parse_overrides, yaml_value

    for key, text in parse_overrides(overrides)[0].items():
        value = yaml_value(text)
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return d


def check_types(recipe: Path, overrides: list[str]) -> None:
    """Raise ConfigError naming every recipe field or override of the wrong type."""
    import yaml

    try:
        d = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return  # the config reads it again and says what is wrong
    if not isinstance(d, dict):
        return
    problems = type_problems(BuildConfig, _with_overrides(d, overrides))
    if problems:
        raise ConfigError("; ".join(problems))


def missing_source_files(cfg: BuildConfig) -> list[str]:
    """'source.FIELD=PATH' for each path the source names that does not exist."""
    src = cfg.source
    return [f"source.{name}={getattr(src, name)}" for name in ("path", "images", "captions", "instances", "metadata")
            if getattr(src, name) and not os.path.exists(getattr(src, name))]


def teacher_problem(cfg: BuildConfig) -> str | None:
    """A local teacher model given as a path that does not exist (a hub name has no leading / . ~)."""
    t = cfg.teacher
    if t.kind == "hf" and t.model and t.model.startswith(("/", "./", "../", "~")) \
            and not os.path.exists(os.path.expanduser(t.model)):
        return f"teacher.model={t.model}: no such model folder"
    return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlm-judge data", description="Build Perception-Collection-style judge data.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="run or resume a build from a recipe",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe fields (dotted keys)")
    b.add_argument("--out", help="run folder (a re-run with the same folder resumes)")
    b.add_argument("--limit", type=int, help="use at most N images")
    b.add_argument("--concurrency", type=int, help="teacher calls in flight")
    b.add_argument("--no-progress", action="store_true", help="no progress bars (the summary is still printed)")
    b.add_argument("--dry-run", action="store_true", help="validate the recipe, print it resolved, and stop")
    sub.add_parser("recipes", help="list the shipped recipes, one line each")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlm-judge data`; returns the exit status."""
    ap = _parser()
    try:
        # overrides may come after the flags: argparse's positional list stops at the first flag
        args, extra = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse exits 2 on bad usage and 0 on --help
        return int(e.code or 0)
    flags_unknown = [e for e in extra if e.startswith("-")]
    if flags_unknown or (extra and args.cmd != "build"):
        print(f"vlm-judge data: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return EXIT_USAGE
    if args.cmd == "recipes":
        for name, path in shipped_recipes().items():
            print(f"{name:<16} {describe_recipe(path)}")
        print(f"\n(files in {RECIPES_DIR}; copy one to change it)")
        return EXIT_OK
    try:
        recipe = resolve_recipe(args.recipe)
        check_types(recipe, list(args.overrides) + extra)
        cfg = BuildConfig.from_yaml(recipe)
        flags = list(args.overrides) + extra
        if args.out:
            flags.append(f"out={args.out}")
        if args.limit is not None:
            flags.append(f"source.limit={args.limit}")
        if args.concurrency is not None:
            flags.append(f"teacher.concurrency={args.concurrency}")
        if flags:
            cfg = cfg.with_overrides(flags)
    except ConfigError as e:
        print(f"vlm-judge data build: bad recipe: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        print(f"vlm-judge data build: missing dependency: {e}", file=sys.stderr)
        return EXIT_FAILED
    from perception_collection.pipeline import build, resolved_recipe_yaml

    if args.dry_run:
        print(resolved_recipe_yaml(cfg), end="")
    missing = missing_source_files(cfg)
    # one path rule: a recipe's relative paths are its folder's, an override's the working folder's
    where = (f" (a recipe's relative paths are taken from its folder, {recipe.parent}; point them at your data"
             " with source.FIELD=PATH, relative to the working folder, or copy the recipe beside the data)") if missing else ""
    problems = [f"source file(s) not found: {', '.join(missing)}{where}"] if missing else []
    problems += [p for p in (teacher_problem(cfg), output_problem(cfg.out, folder=True, name="out")) if p]
    if problems:
        print(f"vlm-judge data build: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        return EXIT_OK

    from perception_collection.sources import SourceError
    from perception_collection.store import RunLocked

    try:
        summary = build(cfg, progress=not args.no_progress)
    except SourceError as e:
        print(f"vlm-judge data build: cannot read the source: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunLocked as e:
        print(f"vlm-judge data build: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as e:  # e.g. the teacher's server does not answer its up-front check
        print(f"vlm-judge data build: teacher: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        print(f"vlm-judge data build: missing dependency: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # e.g. a teacher model transformers cannot find or read
        print(f"vlm-judge data build: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nvlm-judge data build: interrupted; run the same command again to resume in {cfg.out}",
              file=sys.stderr)
        return 130
    if args.no_progress:  # (with progress on, build() has printed it)
        print(summary.format_table())
    if summary.counts.get("kept", 0) == 0:
        print(f"vlm-judge data build: no example was produced; see {cfg.out}/drops.jsonl for the reasons",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
