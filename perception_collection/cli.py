"""`vlm-judge data build RECIPE.yaml [--out DIR] [--limit N] [KEY=VALUE ...]`: build judge data.

RECIPE is a YAML file (a saved BuildConfig) or the name of a shipped recipe (`vlm-judge data
recipes` lists them). Dotted KEY=VALUE arguments override recipe fields, e.g.
`teacher.base_url=http://gpu-box:8000/v1 counts.rubrics_per_image=3`.

Exit status: 0 when the build finished, 1 when it produced no example or failed on the way
(the reason is printed; a re-run resumes), 2 for a bad recipe or command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perception_collection.config import BuildConfig, ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of the recipes that ship with the package."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (with or without .yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_recipes()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if stem in shipped and len(p.parts) == 1:
        return shipped[stem]
    raise ConfigError(f"recipe not found: {name_or_path} (shipped recipes: {', '.join(shipped) or 'none'})")


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
    sub.add_parser("recipes", help="list the shipped recipes")
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
            print(f"{name:<16} {path}")
        return EXIT_OK
    try:
        cfg = BuildConfig.from_yaml(resolve_recipe(args.recipe))
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
    except ImportError as e:
        print(f"vlm-judge data build: missing dependency: {e}", file=sys.stderr)
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
