"""The judge folder a training run writes, and how to load it back.

A judge folder holds the weights (a LoRA adapter or full weights), the processor/tokenizer, the
resolved recipe (`recipe.yaml`), and the card `vlm_judge.json` that `vlm_judge.scorer.Judge.load`
reads: {"backend": "hf", "template", "kind", "base_model", "adapter", "version", ...}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_judge import __version__
from vlm_judge.scorer import JUDGE_CARD


def write_card(out: Path, *, template: str, kind: str, base_model: str, adapter: bool, **extra: Any) -> dict[str, Any]:
    card = {
        "backend": "hf", "template": template, "kind": kind, "base_model": base_model,
        "adapter": adapter, "version": __version__, **extra,
    }
    (out / JUDGE_CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def read_card(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / JUDGE_CARD
    if not p.is_file():
        raise FileNotFoundError(f"{folder} is not a judge folder: no {JUDGE_CARD}")
    return json.loads(p.read_text(encoding="utf-8"))


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

    from train.model import fix_processor

    folder = Path(folder)
    card = read_card(folder)
    dtype = dtype or torch.float32
    cls = AutoModelForImageTextToText if card["kind"] == "vision" else AutoModelForCausalLM
    if card.get("adapter"):
        from peft import PeftModel

        base = cls.from_pretrained(card["base_model"], dtype=dtype)
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        model = cls.from_pretrained(str(folder), dtype=dtype)
    if card["kind"] == "vision":
        proc = fix_processor(AutoProcessor.from_pretrained(str(folder)), model.config)
    else:
        proc = AutoTokenizer.from_pretrained(str(folder))
    model.eval()
    return model, proc, card
