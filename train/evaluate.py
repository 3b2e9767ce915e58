"""Held-out evaluation during training, through the shared scorer and the shared decoder.

The model being trained is wrapped by `HFBackend.from_model` (the decoder `vlm-judge score` uses)
and graded by `vlm_judge.scorer.Judge`, so the parse rate and correlations measured here are those
a user gets from `vlm-judge score` with the saved judge: same renderer, same chat layout
(`vlm_judge.chat`), same decoding, same parser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.data import Example
from train.encode import Encoder
from vlm_judge.backends.base import GenerationParams
from vlm_judge.records import Judgment
from vlm_judge.scorer import Judge, ScorerConfig
from vlm_judge.store import judge_cached


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r; NaN when fewer than 2 pairs or a constant side (no correlation is defined)."""
    if len(x) < 2:
        return float("nan")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def heldout_judgments(model: Any, encoder: Encoder | None, examples: Sequence[Example], batch_size: int = 8,
                      max_new_tokens: int = 256, backend: Any = None, template: str | None = None,
                      save: str | Path | None = None) -> list[Judgment]:
    """The judge's greedy judgments of held-out examples, one retry-free attempt each, no swap.
    `model` is decoded in memory with `encoder`'s processor; `backend` replaces it (e.g. a served judge).
    `save`: a JSONL file the judgments are written to through the judgment store (the lines
    `vlm-judge score` writes). It is started afresh: the weights change between evaluations, so
    nothing in it may be reused."""
    if not examples:
        return []
    was_training = bool(getattr(model, "training", False))
    if backend is None:
        from vlm_judge.backends.hf import HFBackend

        backend = HFBackend.from_model(model, encoder.processor, name="in-training", batch_size=batch_size)
    cfg = ScorerConfig(template=template or (encoder.template if encoder else "default"), batch_size=batch_size,
                       max_parse_retries=0, swap=False,
                       params=GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
    if save is not None:
        Path(save).unlink(missing_ok=True)
    try:
        return judge_cached(Judge(backend, cfg, name="in-training"), [ex.request for ex in examples], save)
    finally:
        if was_training:  # the decoder puts the model in eval mode; training goes on after this
            model.train()


def metrics(judgments: Sequence[Judgment], examples: Sequence[Example]) -> dict[str, float]:
    """Parse rate and agreement with the gold verdicts (aligned lists)."""
    if not examples:
        return {}
    ok = [(j, ex) for j, ex in zip(judgments, examples) if j.status == "ok"]
    out: dict[str, float] = {"eval/parse_rate": len(ok) / len(examples), "eval/n": float(len(examples))}
    abs_pairs = [(float(j.score), float(ex.verdict)) for j, ex in ok if ex.request.mode == "absolute"]
    if abs_pairs:
        out["eval/pearson"] = pearson([a for a, _ in abs_pairs], [b for _, b in abs_pairs])
        out["eval/exact"] = sum(a == b for a, b in abs_pairs) / len(abs_pairs)
    rel = [(j.score, ex.verdict) for j, ex in ok if ex.request.mode == "relative"]
    if rel:
        out["eval/pair_accuracy"] = sum(a == b for a, b in rel) / len(rel)
    return out


def evaluate(model: Any, encoder: Encoder | None, examples: Sequence[Example], batch_size: int = 8,
             max_new_tokens: int = 256, backend: Any = None, template: str | None = None,
             save: str | Path | None = None) -> dict[str, float]:
    """Metrics of `heldout_judgments` (same arguments)."""
    return metrics(heldout_judgments(model, encoder, examples, batch_size, max_new_tokens, backend, template, save),
                   examples)
