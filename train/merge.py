"""Merge an absolute-grading judge and a relative-grading judge into one (Prometheus 2).

Methods:
- linear: a weighted average of the weights. Two LoRA adapters of one base stay an adapter,
  merged with peft's `add_weighted_adapter(combination_type="cat")`, which is the exact weighted
  sum of the two weight updates (peft's "linear" mixes the A and B factors separately and so adds
  cross terms). Otherwise the full weights are averaged.
- ties / dare / dare_ties: on task vectors (judge weights minus the base weights), with
  peft.utils.merge_utils; the result is full weights = base + merged task vector.

`vlm-judge train merge ABS_JUDGE REL_JUDGE --out DIR [--method linear] [--weights 0.5,0.5]`
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from train.judge_folder import base_model_of, load_judge, write_card
from vlm_judge.card import CARD_FILE, load_card

METHODS = ("linear", "ties", "dare", "dare_ties")


def _check_compatible(cards: list[dict[str, Any]]) -> None:
    kinds = {c["kind"] for c in cards}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge judges of different kinds: {sorted(kinds)}")
    bases = {c.get("base_model") for c in cards}
    if len(bases) != 1:
        raise ValueError(f"cannot merge judges trained from different base models: {sorted(map(str, bases))}")


def check_no_outside_links(folder: str | Path) -> None:
    """Refuse a judge folder holding a symlink whose target lies outside it: merging copies and
    loads the files it finds, and must not carry a file from elsewhere into the merged judge."""
    root = Path(folder).resolve()
    for p in Path(folder).rglob("*"):
        if p.is_symlink():
            target = p.resolve()
            if target != root and root not in target.parents:
                raise ValueError(f"{p} is a symlink to {target}, outside the judge folder {folder}; "
                                 "copy the file into the folder (or remove the link) to merge it")


def merge_judges(
    judges: list[str | Path], out: str | Path, weights: list[float] | None = None, method: str = "linear",
    density: float = 0.5, seed: int = 0, template: str | None = None,
) -> Path:
    """Merge judge folders into a new judge folder at `out`; returns it."""
    import torch

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if len(judges) < 2:
        raise ValueError("merging needs at least two judges")
    weights = weights or [1.0 / len(judges)] * len(judges)
    if len(weights) != len(judges):
        raise ValueError(f"{len(weights)} weights for {len(judges)} judges")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    for j in judges:
        check_no_outside_links(j)
    # base paths inside a judge folder are relative to it: compare and load them resolved
    cards = [{**c, "base_model": base_model_of(j, c)} for j in judges for c in [load_card(j, required=True)]]
    _check_compatible(cards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    templates = {c.get("template", "default") for c in cards}
    template = template or cards[0].get("template", "default")
    extra = {"merged_from": [str(j) for j in judges], "merge_method": method, "merge_weights": weights}
    if method != "linear":
        extra["merge_density"] = density
    if len(templates) > 1:
        extra["note"] = f"source judges used templates {sorted(templates)}; merged judge uses {template!r}"

    all_adapters = all(c.get("adapter") for c in cards)
    plain_lora = all_adapters and not any(_has_modules_to_save(j) for j in judges)
    if method == "linear" and plain_lora:
        _merge_adapters_cat(judges, cards[0], out, weights)
        _copy_processor(judges[0], out)
        write_card(out, template=template, kind=cards[0]["kind"], base_model=cards[0]["base_model"],
                   adapter=True, **extra)
        return out

    models = []
    for j in judges:
        m, _, card = load_judge(j)
        if card.get("adapter"):
            m = m.merge_and_unload()
        models.append(m)
    sds = [m.state_dict() for m in models]
    base_sd = None
    if method != "linear":
        base_sd = _load_base_state(cards[0])
    merged: dict[str, Any] = {}
    w = torch.tensor(weights, dtype=torch.float32)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # DARE's random drops are reproducible
    from peft.utils import merge_utils

    for k, v0 in sds[0].items():
        if not torch.is_floating_point(v0):
            merged[k] = v0
            continue
        ts = [sd[k].float() for sd in sds]
        if method == "linear":
            merged[k] = sum(wi * t for wi, t in zip(weights, ts)).to(v0.dtype)
            continue
        base = base_sd[k].float()
        taus = [t - base for t in ts]
        if all(torch.equal(t, taus[0]) for t in taus) and not taus[0].any():
            merged[k] = v0  # untouched by training (e.g. a frozen vision tower)
            continue
        fn = {"ties": merge_utils.ties, "dare": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties}[method]
        merged[k] = (base + fn(taus, w, density)).to(v0.dtype)
    torch.random.set_rng_state(gen_state)
    models[0].load_state_dict(merged)
    models[0].save_pretrained(out)
    _copy_processor(judges[0], out)
    write_card(out, template=template, kind=cards[0]["kind"], base_model=cards[0]["base_model"], adapter=False, **extra)
    return out


def _has_modules_to_save(folder: str | Path) -> bool:
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    return bool(cfg.get("modules_to_save"))


def _load_base_state(card: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if card["kind"] == "vision" else AutoModelForCausalLM
    return cls.from_pretrained(card["base_model"]).state_dict()


def _merge_adapters_cat(judges: list[str | Path], card: dict[str, Any], out: Path, weights: list[float]) -> None:
    """Exact weighted sum of LoRA updates: concatenate the factors (rank = sum of ranks)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if card["kind"] == "vision" else AutoModelForCausalLM
    base = cls.from_pretrained(card["base_model"])
    names = [f"judge{i}" for i in range(len(judges))]
    model = PeftModel.from_pretrained(base, str(judges[0]), adapter_name=names[0])
    for name, j in zip(names[1:], judges[1:]):
        model.load_adapter(str(j), adapter_name=name)
    model.add_weighted_adapter(names, weights, adapter_name="merged", combination_type="cat")
    model.set_adapter("merged")
    for n in names:
        model.delete_adapter(n)
    tmp = out / "_merged_tmp"
    model.save_pretrained(tmp, selected_adapters=["merged"])
    # peft writes a non-default adapter into a subfolder named after it; a judge folder holds it at the top
    src = tmp / "merged" if (tmp / "merged").is_dir() else tmp
    for f in src.iterdir():
        shutil.move(str(f), out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _copy_processor(src: str | Path, out: Path) -> None:
    skip = {"adapter_model.safetensors", "adapter_config.json", CARD_FILE, "model.safetensors",
            "config.json", "generation_config.json", "train_log.json", "recipe.yaml"}
    for f in Path(src).iterdir():
        if f.is_file() and not f.is_symlink() and f.name not in skip and not f.name.startswith("model-") and f.name != "README.md":
            shutil.copy2(f, out / f.name)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vlm-judge train merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("judges", nargs="+", help="judge folders, e.g. an absolute judge then a relative judge")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=METHODS, default="linear")
    ap.add_argument("--weights", default=None, help="comma-separated, one per judge (default: equal)")
    ap.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of each task vector kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default=None, help="template of the merged judge (default: the first judge's)")
    a = ap.parse_args(argv)
    try:
        weights = [float(x) for x in a.weights.split(",")] if a.weights else None
        for j in a.judges:
            load_card(j, required=True)  # a wrong path is one line, before any model loads
        out = merge_judges(a.judges, a.out, weights, a.method, a.density, a.seed, a.template)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm-judge train merge: {e}", file=sys.stderr)
        return 2
    print(f"merged judge written to {out}")
    return 0
