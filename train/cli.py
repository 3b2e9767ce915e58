"""`vlm-judge train RECIPE.yaml [--field value ...]` and `vlm-judge train merge ...`.

Flags override recipe fields by name (`--lr 1e-4`, `--lora.r 8`, `--lora_r 8` or `lora.r=8`,
`--train_data a.jsonl,b.jsonl`). `--check` loads and validates the recipe, prints the resolved
recipe and exits. Under `accelerate launch -m vlm_judge.cli train ...` the same command runs on
N GPUs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

from train.config import TrainConfig
from vlm_judge import options
from vlm_judge.options import ConfigError
from vlm_judge.options import parse_overrides as _parse_overrides

SWITCHES = ("check", "help")

RECIPES_DIR = Path(__file__).parent / "recipes"

USAGE = """usage: vlm-judge train RECIPE [--check] [--FIELD VALUE ...]
       vlm-judge train merge JUDGE_ABS JUDGE_REL --out DIR [--method linear|ties|dare|dare_ties] [--weights 0.5,0.5]

Fine-tune a vision (LLaVA-family) or text judge on feedback-then-score targets; the output folder
is a judge folder that `vlm-judge score --judge DIR` loads. RECIPE is a YAML file or the name of a
shipped recipe ({recipes}). --check prints the resolved recipe and stops.
Multi-GPU: accelerate launch --config_file train/recipes/accelerate/ddp.yaml -m vlm_judge.cli train RECIPE"""


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of the training recipes that ship with the package."""
    return options.shipped_recipes(RECIPES_DIR)


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file, or the name of a shipped recipe (vlm_judge.options.resolve_recipe)."""
    return options.resolve_recipe(name_or_path, RECIPES_DIR)


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string under its line in train/config.py)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def fields_help() -> str:
    """The recipe fields, each with its type, default and docstring (the --help listing)."""
    docs = field_docs()
    lines = ["recipe fields (in the YAML, or as --FIELD VALUE; nested lora: {r: 8} is --lora.r 8 or --lora_r 8):"]
    for f in dataclasses.fields(TrainConfig):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        head = f"  --{f.name} ({str(f.type).replace('typing.', '')}; default {default!r})"
        lines.append(head)
        if docs.get(f.name):
            lines += textwrap.wrap(docs[f.name], 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def full_usage() -> str:
    return USAGE.format(recipes=", ".join(shipped_recipes()) or "none") + "\n\n" + fields_help()


def parse_overrides(args: list[str]) -> tuple[dict[str, Any], set[str]]:
    """['--lr', '1e-4', '--x=y', 'lora.r=8', '--check'] -> ({'lr': '1e-4', 'x': 'y', 'lora.r': '8'}, {'check'})
    (the one override parser, with train's two switches)."""
    return _parse_overrides(args, switches=SWITCHES)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(full_usage())
        return 0
    if argv[0] == "merge":
        from train.merge import main as merge_main

        return merge_main(argv[1:])
    recipe, rest = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)
    try:
        overrides, switches = parse_overrides(rest)
        if "help" in switches:
            print(full_usage())
            return 0
        cfg = TrainConfig.load(resolve_recipe(recipe) if recipe is not None else None, overrides)
    except ConfigError as e:
        print(f"vlm-judge train: bad recipe: {e}", file=sys.stderr)
        return 2
    from train.loop import check_inputs

    try:
        check_inputs(cfg)  # missing data files and the like: said before any model loads
        problem = None
    except ConfigError as e:
        problem = str(e)
    if "check" in switches:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        if problem:  # --check validates the recipe; the files it names may be made later (a template recipe)
            print(f"vlm-judge train: note: a run would stop here: {problem}", file=sys.stderr)
        return 0
    if problem:
        print(f"vlm-judge train: {problem}", file=sys.stderr)
        return 2
    from train.checkpoint import CheckpointError
    from train.data import RowError
    from train.loop import train

    try:
        res = train(cfg)
    except (RowError, CheckpointError, ConfigError) as e:
        print(f"vlm-judge train: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"vlm-judge train: missing dependency: {e} (pip install 'vlm-judge[train]')", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a base model transformers cannot find or read
        print(f"vlm-judge train: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    if res.is_main:
        print(f"judge written to {res.output_dir} after {res.step} steps")
    return 0
