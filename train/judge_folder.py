"""The judge folder a training run writes, and how to load it back.

A judge folder holds the weights (a LoRA adapter or full weights), the processor/tokenizer, the
resolved recipe (`recipe.yaml`), and the judge card (`vlm_judge.card`) that
`vlm_judge.scorer.Judge.load` reads: {"backend": "hf", "template", "kind", "base_model", "adapter",
"version", ...}. A base model stored inside the folder (a tiny base built for the run) is written
as a path relative to the folder, in the card and in `adapter_config.json`, so the folder can be
moved or copied as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_judge import __version__
from vlm_judge.card import load_card, resolve_base_model, save_card
from vlm_judge.chat import fix_llava_processor


def relative_to_folder(folder: str | Path, path: str) -> str:
    """`path` relative to `folder` when it is an existing path inside it (so the folder can move),
    else as given (a hub name is never a path)."""
    try:
        if not Path(path).exists():
            return path
        return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except (ValueError, OSError):
        return path


def write_card(out: Path, *, template: str, kind: str, base_model: str, adapter: bool, **extra: Any) -> dict[str, Any]:
    """Save a trained judge's card (through vlm_judge.card) and return it."""
    card = {
        "backend": "hf", "template": template, "kind": kind, "base_model": relative_to_folder(out, base_model),
        "adapter": adapter, "version": __version__, **extra,
    }
    return save_card(out, card)


def base_model_of(folder: str | Path, card: dict[str, Any]) -> str:
    """The card's base model as a loadable name (a relative path resolved against the folder)."""
    return resolve_base_model(folder, card["base_model"])


def _relative_adapter_base(out: Path) -> None:
    """peft writes the base's absolute path into adapter_config.json; store it relative when inside."""
    p = out / "adapter_config.json"
    if not p.is_file():
        return
    acfg = json.loads(p.read_text(encoding="utf-8"))
    base = acfg.get("base_model_name_or_path")
    if base and relative_to_folder(out, base) != base:
        acfg["base_model_name_or_path"] = relative_to_folder(out, base)
        p.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_judge(model: Any, processor: Any, out: str | Path, cfg: Any, base_model: str,
               merge_adapter: bool = False, state_dict: dict | None = None, **card_extra: Any) -> Path:
    """Write weights, processor, recipe and card. `model` is unwrapped (peft or plain); `state_dict`
    is the gathered full state dict under FSDP/DeepSpeed (where the module holds only a shard)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_adapter:
        model = model.merge_and_unload()
        is_peft = False
        state_dict = None
    model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
    _relative_adapter_base(out)
    processor.save_pretrained(out)
    if cfg is not None:
        cfg.save(out / "recipe.yaml")
    write_card(out, template=cfg.template if cfg is not None else card_extra.pop("template", "default"),
               kind=cfg.kind if cfg is not None else card_extra.pop("kind"), base_model=base_model,
               adapter=is_peft, **card_extra)
    return out


def load_judge(folder: str | Path, dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, processor, card) for a judge folder: the base + adapter, or the full weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    folder = Path(folder)
    card = load_card(folder, required=True)
    dtype = dtype or torch.float32
    cls = AutoModelForImageTextToText if card["kind"] == "vision" else AutoModelForCausalLM
    if card.get("adapter"):
        from peft import PeftModel

        base = cls.from_pretrained(base_model_of(folder, card), dtype=dtype)
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        model = cls.from_pretrained(str(folder), dtype=dtype)
    if card["kind"] == "vision":
        proc = fix_llava_processor(AutoProcessor.from_pretrained(str(folder)), model.config)
    else:
        proc = AutoTokenizer.from_pretrained(str(folder))
    model.eval()
    return model, proc, card
