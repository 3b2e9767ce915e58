"""`vlm-judge train RECIPE.yaml [--field value ...]` and `vlm-judge train merge ...`.

Flags override recipe fields by name (`--lr 1e-4`, `--lora.r 8`, `--lora_r 8` or `lora.r=8`,
`--train_data a.jsonl,b.jsonl`). `--check` loads and validates the recipe, prints the resolved
recipe and exits. Under `accelerate launch -m vlm_judge.cli train ...` the same command runs on
N GPUs.
"""

from __future__ import annotations

import sys
from typing import Any

from train.config import TrainConfig
from vlm_judge.options import ConfigError
from vlm_judge.options import parse_overrides as _parse_overrides

SWITCHES = ("check", "help")

USAGE = """usage: vlm-judge train RECIPE.yaml [--check] [--FIELD VALUE ...]
       vlm-judge train merge JUDGE_ABS JUDGE_REL --out DIR [--method linear|ties|dare|dare_ties] [--weights 0.5,0.5]

Fine-tune a vision (LLaVA-family) or text judge on feedback-then-score targets; the output folder
is a judge folder that `vlm-judge score --judge DIR` loads. Recipes: train/recipes/*.yaml.
Multi-GPU: accelerate launch --config_file train/recipes/accelerate/ddp.yaml -m vlm_judge.cli train RECIPE.yaml"""


def parse_overrides(args: list[str]) -> tuple[dict[str, Any], set[str]]:
    """['--lr', '1e-4', '--x=y', 'lora.r=8', '--check'] -> ({'lr': '1e-4', 'x': 'y', 'lora.r': '8'}, {'check'})
    (the one override parser, with train's two switches)."""
    return _parse_overrides(args, switches=SWITCHES)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "merge":
        from train.merge import main as merge_main

        return merge_main(argv[1:])
    recipe, rest = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)
    try:
        overrides, switches = parse_overrides(rest)
        if "help" in switches:
            print(USAGE)
            return 0
        cfg = TrainConfig.load(recipe, overrides)
    except ConfigError as e:
        print(f"vlm-judge train: bad recipe: {e}", file=sys.stderr)
        return 2
    if "check" in switches:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from train.loop import train

    res = train(cfg)
    if res.is_main:
        print(f"judge written to {res.output_dir} after {res.step} steps")
    return 0
