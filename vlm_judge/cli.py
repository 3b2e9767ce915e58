"""The `vlm-judge` command. Each subcommand lives in its own module and is imported only when
used, so `vlm-judge score` never loads training code (and `vlm_judge` never imports it)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# subcommand -> ("module:function taking argv and returning an exit code", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("vlm_judge.score_cmd:main", "score a JSONL / datasets file with a judge"),
    "data": ("perception_collection.cli:main", "build Perception-Collection-style judge data"),
    "train": ("train.cli:main", "fine-tune a vision or text judge from a recipe"),
    "eval": ("eval.cli:main", "meta-evaluate judges on a benchmark and write a report"),
    "demo": ("demo.run:main", "run the whole loop offline on a laptop (needs the [demo] extra)"),
    "serve": ("vlm_judge.serve:main", "serve a judge over an OpenAI-compatible HTTP API"),
    "convert": ("vlm_judge.convert:main", "turn an original LLaVA checkpoint (Prometheus-Vision) into a judge folder"),
}


def _usage() -> str:
    lines = ["usage: vlm-judge COMMAND [options]   (vlm-judge COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _import_installed(module_name: str) -> ModuleType:
    """Import a subcommand module from the packages installed beside `vlm_judge`. `train` and `eval`
    are generic names: with `python -m vlm_judge.cli`, the working folder comes first on sys.path,
    so a user's own train.py or eval.py would otherwise be imported in their place."""
    top = module_name.split(".")[0]
    folder = Path(__file__).resolve().parent.parent / top
    if top not in sys.modules and (folder / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(top, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[top] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[top]
            raise
    return importlib.import_module(module_name)


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
        module = _import_installed(module_name)
    except ImportError as e:
        print(f"vlm-judge {argv[0]}: missing dependency: {e}", file=sys.stderr)
        return 1
    return int(getattr(module, func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
