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
from vlm_judge.card import CARD_FILE, load_card, resolve_base_model, save_card
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


def _metric_table(evals: list[dict[str, float]]) -> list[str]:
    names = sorted({k for e in evals for k in e if k != "step"})
    lines = ["| step | " + " | ".join(n.removeprefix("eval/") for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for e in evals:
        cells = [f"{e[n]:.4g}" if isinstance(e.get(n), float) else str(e.get(n, "")) for n in names]
        lines.append(f"| {int(e.get('step', 0))} | " + " | ".join(cells) + " |")
    return lines


def write_readme(out: str | Path, cfg: Any, base_model: str, *, steps: int, evals: list[dict[str, float]],
                 data_summary: str, skipped: dict[str, int] | None = None) -> Path:
    """README.md of a judge folder: a model card saying what it is (base, data, template, training),
    how it did on held-out data during training, and how to score with it. Replaces the empty
    template peft's save_pretrained leaves there. URLs in it keep no credentials."""
    from vlm_judge.redact import redact_text

    out = Path(out)
    kind = "vision (image + text)" if cfg.kind == "vision" else "text-only"
    tuned = (f"LoRA (r={cfg.lora_r}, alpha={cfg.lora_alpha}" + (", merged into the weights)" if
             cfg.merge_adapter_on_save else "; the folder holds the adapter)")) if cfg.finetune == "lora" \
        else "full fine-tuning"
    lines = [
        "---", "library_name: vlm-judge", f"base_model: {base_model}",
        "tags: [vlm-judge, llm-as-a-judge, " + ("lora]" if cfg.finetune == "lora" else "full-finetune]"), "---", "",
        f"# {out.name}: a {kind} judge",
        "",
        "Given an instruction, a response, a score rubric (and an optional reference answer"
        + (" and image" if cfg.kind == "vision" else "") + "), it writes feedback against the rubric and then "
        "a verdict: `So the overall score is N` plus `[RESULT] N` (1-5), or `[RESULT] A`/`B` for a pair. "
        f"Trained with vlm-judge {__version__}.",
        "",
        "## Base model", "", f"`{base_model}`, {tuned}.", "",
        "## Training data", "",
        *[f"- `{f}`" for f in cfg.train_data],
        "", f"Rows: {data_summary}. Mode: {cfg.mode}; swap augmentation {'on' if cfg.swap_augment else 'off'}; "
            f"reference dropout {cfg.reference_dropout:g}.",
    ]
    if skipped:
        lines += ["", "Skipped rows by reason:", *[f"- {n} x {reason}" for reason, n in sorted(skipped.items(),
                                                                                          key=lambda kv: -kv[1])]]
    lines += [
        "", "## Prompt template", "",
        f"`{cfg.template}` (vlm_judge.prompts; recorded in `{CARD_FILE}`, so the scorer renders the same prompt "
        "the judge was trained on).",
        "", "## Training", "",
        f"{steps} optimizer steps; lr {cfg.lr:g} ({cfg.lr_schedule}, {cfg.warmup_steps} warmup steps), "
        f"batch {cfg.per_device_batch_size} per device x grad_accum {cfg.grad_accum}, max_length {cfg.max_length}, "
        f"seed {cfg.seed}. The full resolved recipe is `recipe.yaml`; losses per step are in `train_log.json`.",
        "", "## In-training evaluation", "",
    ]
    if evals:
        held = ", ".join(f"`{f}`" for f in cfg.eval_data) or f"{cfg.eval_fraction:g} of the training rows"
        lines += [f"On held-out data ({held}; at most {cfg.eval_max_rows} rows, greedy, "
                  f"{cfg.eval_max_new_tokens} new tokens): parse_rate = share of outputs with a verdict; "
                  "exact / pearson against the gold scores; pair_accuracy for pairs.", "", *_metric_table(evals)]
    else:
        lines += ["None: the recipe had no held-out data (eval_data or eval_fraction)."]
    lines += [
        "", "## How to score with it", "",
        "```bash", f"vlm-judge score answers.jsonl --judge {out} --out scored.jsonl", "```", "",
        "```python", "from vlm_judge.scorer import Judge", "",
        f'judge = Judge.load("{out}")',
        'judgments = judge.absolute_grade(instructions, responses, rubric, reference_answers'
        + (", images=image_paths)" if cfg.kind == "vision" else ")"),
        "```", "",
    ]
    path = out / "README.md"
    path.write_text(redact_text("\n".join(lines)), encoding="utf-8")
    return path
