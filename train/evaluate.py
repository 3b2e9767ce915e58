"""Held-out evaluation during training, through the shared scorer.

The model being trained is wrapped in a small in-memory backend (the `Backend` protocol: prompts
in, text out) and graded by `vlm_judge.scorer.Judge`, so the parse rate and correlations measured
here are those a user gets from `vlm-judge score` with the saved judge: same renderer, same
chat layout (`train.encode.chat_messages`), same parser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from train.data import Example
from train.encode import Encoder
from vlm_judge.backends.base import Generation, GenerationParams, Prompt
from vlm_judge.scorer import Judge, ScorerConfig


class InMemoryBackend:
    """Greedy/sampled generation with a model object already in memory (peft or plain)."""

    def __init__(self, model: Any, encoder: Encoder, name: str = "in-training") -> None:
        self.model = model
        self.encoder = encoder
        self.name = name

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        import torch

        tok = self.encoder.tokenizer
        try:
            batch = self.encoder.encode_prompts(prompts)
        except Exception as e:  # noqa: BLE001 - report per prompt, never raise for the batch
            return [Generation(text=None, error=f"encode failed: {e}") for _ in prompts]
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        batch = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in batch.items()}
        kw: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id)
        if params.temperature > 0:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(**batch, **kw)
        if was_training:
            self.model.train()
        n = batch["input_ids"].shape[1]
        gens = []
        for row, ids in zip(out, batch["input_ids"]):
            new = row[n:]
            text = tok.decode(new, skip_special_tokens=True)
            gens.append(Generation(text=text, prompt_tokens=int((ids != tok.pad_token_id).sum()),
                                   completion_tokens=int((new != tok.pad_token_id).sum())))
        return gens


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


def evaluate(model: Any, encoder: Encoder | None, examples: Sequence[Example], batch_size: int = 8,
             max_new_tokens: int = 256, backend: Any = None, template: str | None = None) -> dict[str, float]:
    """Parse rate and agreement with the gold verdicts on held-out examples (`backend` replaces the
    in-memory model, e.g. a served judge)."""
    if not examples:
        return {}
    backend = backend or InMemoryBackend(model, encoder)
    cfg = ScorerConfig(template=template or (encoder.template if encoder else "default"), batch_size=batch_size, max_parse_retries=0, swap=False,
                       params=GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
    judgments = Judge(backend, cfg).grade([ex.request for ex in examples])
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
