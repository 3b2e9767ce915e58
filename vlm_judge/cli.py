"""The `vlm-judge` command. Each subcommand lives in its own module and is imported only when
used, so `vlm-judge score` never loads training code (and `vlm_judge` never imports it)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function taking argv and returning an exit code", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("vlm_judge.score_cmd:main", "score a JSONL / datasets file with a judge"),
    "data": ("perception_collection.cli:main", "build Perception-Collection-style judge data"),
    "train": ("train.cli:main", "fine-tune a vision or text judge from a recipe"),
    "eval": ("eval.cli:main", "meta-evaluate judges on a benchmark and write a report"),
    "demo": ("demo.run:main", "run the whole loop offline on a laptop (needs the [demo] extra)"),
    "serve": ("vlm_judge.serve:main", "serve a judge over an OpenAI-compatible HTTP API"),
}


def _usage() -> str:
    lines = ["usage: vlm-judge COMMAND [options]   (vlm-judge COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vlm_judge import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"vlm-judge: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[argv[0]]
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"vlm-judge {argv[0]}: missing dependency: {e}", file=sys.stderr)
        return 1
    return int(getattr(module, func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
