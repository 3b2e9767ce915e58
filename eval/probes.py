"""Bias probes (CoBBLEr-style, as used in the FLAMe paper) and the image-grounding probe.

Each probe changes a request in a way that should (or should not) change the verdict, re-judges
it with the same judge, and reports the rate at which the verdict moved:

- order: the two responses swapped (relative only). Should not move.
- length: the response padded with content-free text (relative: the response the judge did not
  prefer). Should not move.
- bandwagon: a note that most people preferred the other response / gave the opposite score.
  Should not move.
- distraction: an irrelevant sentence added to the response (relative: the preferred one).
  Should not move.
- self: where the judge also wrote responses (`BenchItem.model`), how often it favours its own
  response against the human verdict, beside the same rate on other models' responses.
  No re-judging.
- grounding: the same request with an unrelated image (vision judges). SHOULD move: a judge
  whose verdict never changes is not looking at the image and is flagged.

The "before" verdict of a relative item is the judge's verdict in the original order (the first
of `Judgment.samples`), and probes re-judge in one order only, so the swap the scorer does by
default cannot hide an order effect.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from eval.benchmarks import BenchItem
from eval.metrics import round_half_up, wilson_interval
from eval.run import judge_cached
from vlm_judge.prompts import swapped
from vlm_judge.records import ImageRef, JudgeRequest, Judgment, Verdict
from vlm_judge.scorer import Judge

PROBES = ("order", "length", "bandwagon", "distraction", "self", "grounding")
SHOULD_MOVE = {"grounding"}
GROUNDING_FLAG_BELOW = 0.1
"""A vision judge whose verdict moves on fewer than this share of image swaps is flagged image-blind."""

PAD = (
    " To put it another way, the answer given above is the answer to the question that was asked."
    " This restates the same answer once more so that it is clear and complete."
)
DISTRACTOR = " As an aside unrelated to the question, a typical garden snail moves at about one metre per hour."


@dataclass
class ProbeResult:
    """How often one probe moved one judge's verdict."""

    probe: str
    judge: str
    applicable: int = 0
    """Items probed where both the original and the probed verdict were read."""
    moved: int = 0
    rate: float = float("nan")
    lo: float = float("nan")
    hi: float = float("nan")
    unreadable: int = 0
    """Items left out because the original or the probed verdict did not parse."""
    should_move: bool = False
    flagged: bool | None = None
    """grounding only: True when the judge looks image-blind."""
    note: str = ""
    baseline_rate: float | None = None
    """self only: the same rate on responses the judge did not write."""
    details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def before_verdict(j: Judgment) -> Verdict:
    """The verdict in the original order (relative with swap keeps both orders in samples)."""
    if j.mode == "relative" and j.samples:
        return j.samples[0]
    return j.score if j.status == "ok" else None


def _other(v: Verdict) -> str:
    return "A" if v == "B" else "B"


def _noise_image(seed: str) -> ImageRef:
    """A deterministic random-noise PNG: unrelated to any benchmark image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(int(hashlib.sha1(seed.encode()).hexdigest()[:8], 16))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return ImageRef(data=buf.getvalue())


def perturb(probe: str, req: JudgeRequest, before: Verdict, other_images: Sequence[tuple[ImageRef, ...]]) -> JudgeRequest | None:
    """The probed request, or None when the probe does not apply to this request."""
    pid = f"{req.id}::{probe}"
    rel = req.mode == "relative"
    if probe == "order":
        return replace(swapped(req), id=pid) if rel else None
    if probe == "length":
        if rel:
            target = "response" if before == "B" else "response_b"  # pad the one not preferred
            text = getattr(req, target)
            return replace(req, id=pid, **{target: text + PAD * max(1, len(text) // len(PAD) + 1)})
        return replace(req, id=pid, response=req.response + PAD * max(1, len(req.response) // len(PAD) + 1))
    if probe == "bandwagon":
        if rel:
            nudge = f"(Note: 90% of people who compared these two responses preferred Response {_other(before)}.)"
        else:
            nudge = f"(Note: most people who read this response rated it {1 if (before or 3) >= 3 else 5} out of 5.)"
        return replace(req, id=pid, instruction=f"{req.instruction}\n\n{nudge}")
    if probe == "distraction":
        if rel:
            target = "response_b" if before == "B" else "response"
            return replace(req, id=pid, **{target: getattr(req, target) + DISTRACTOR})
        return replace(req, id=pid, response=req.response + DISTRACTOR)
    if probe == "grounding":
        if not req.images:
            return None
        # the next image set in the benchmark that differs from this one, else random noise
        own = req.image_key
        ordered = [ims for ims in other_images if "|".join(i.key for i in ims) != own]
        if ordered:
            h = int(hashlib.sha1(req.id.encode()).hexdigest()[:8], 16)
            new = ordered[h % len(ordered)]
        else:
            new = (_noise_image(req.id),)
        return replace(req, id=pid, images=new)
    raise ValueError(f"unknown probe {probe!r}; choose from {PROBES}")


def _moved(probe: str, before: Verdict, after: Verdict) -> bool:
    if probe == "order":  # `after` is in the swapped order: map it back before comparing
        after = {"A": "B", "B": "A"}.get(after, after)  # type: ignore[arg-type]
    return before != after


def run_probe(
    probe: str,
    judge: Judge,
    items: Sequence[BenchItem],
    requests: Sequence[JudgeRequest],
    judgments: Sequence[Judgment],
    cache_dir: str | Path | None = None,
    self_names: Sequence[str] = (),
    judge_kind: str = "vision",
    progress: Callable[[int, int], None] | None = None,
) -> ProbeResult:
    """Run one probe for one judge over the items it judged (`requests` as that judge saw them).
    `progress(done, total)` is called as the probed requests are judged."""
    res = ProbeResult(probe=probe, judge=judge.name, should_move=probe in SHOULD_MOVE)
    if probe == "self":
        return _self_preference(res, items, judgments, self_names)
    if probe == "grounding" and judge_kind == "text":
        res.note = "not applicable: a text judge sees a caption, not the image"
        return res
    images = []
    seen = set()
    for r in requests:
        if r.images and r.image_key not in seen:
            seen.add(r.image_key)
            images.append(r.images)
    if probe == "order" and not any(j.mode == "relative" for j in judgments):
        res.note = "not applicable: the order probe swaps the two responses of pairwise (relative) items"
        return res
    if probe == "order" and all(len(j.samples) >= 2 for j in judgments if j.mode == "relative") and judge.config.swap:
        # the scorer already judged both orders: use them instead of judging again
        pairs = [(it, j.samples[0], j.samples[1]) for it, j in zip(items, judgments) if j.mode == "relative"]
        return _tally(res, [(it.id, b, {"A": "B", "B": "A"}.get(a, a)) for it, b, a in pairs], probe)
    todo, befores, ids = [], [], []
    for it, req, j in zip(items, requests, judgments):
        b = before_verdict(j)
        p = perturb(probe, req, b, images)
        if p is not None:
            todo.append(p)
            befores.append(b)
            ids.append(it.id)
    if not todo:
        res.note = "not applicable to these items"
        return res
    one_order = Judge(judge.backend, replace(judge.config, swap=False), name=judge.name)
    cache = Path(cache_dir) / f"{probe}.jsonl" if cache_dir else None
    after = judge_cached(one_order, todo, cache, progress=progress)
    return _tally(res, [(i, b, a.score) for i, b, a in zip(ids, befores, after)], probe)


def _tally(res: ProbeResult, rows: list[tuple[str, Verdict, Verdict]], probe: str) -> ProbeResult:
    for rid, b, a in rows:
        if b is None or a is None:
            res.unreadable += 1
            continue
        m = _moved(probe, b, a)
        res.applicable += 1
        res.moved += int(m)
        res.details.append({"id": rid, "before": b, "after": a, "moved": m})
    if res.applicable:
        res.rate = res.moved / res.applicable
        res.lo, res.hi = wilson_interval(res.moved, res.applicable)
    if probe == "grounding" and res.applicable:
        res.flagged = res.rate < GROUNDING_FLAG_BELOW
        res.note = ("verdict rarely or never changes with an unrelated image: the judge looks image-blind"
                    if res.flagged else "verdict depends on the image")
    return res


def _self_preference(
    res: ProbeResult, items: Sequence[BenchItem], judgments: Sequence[Judgment], names: Sequence[str]
) -> ProbeResult:
    """Share of the judge's own responses it favours against the human verdict, vs others'."""
    names_set = {n for n in names if n}
    if not names_set:
        res.note = "not applicable: no model name given for this judge's own responses"
        return res
    own_hits = own_n = other_hits = other_n = 0
    for it, j in zip(items, judgments):
        v = before_verdict(j) if it.mode == "relative" else j.score
        if v is None:
            res.unreadable += 1
            continue
        if it.mode == "relative":
            if it.gold == "tie":
                continue
            side = "A" if it.model in names_set else "B" if it.model_b in names_set else None
            if side is None:
                # baseline: how often the judge overrules the humans on pairs it did not write
                other_n += 1
                other_hits += int(v in ("A", "B") and v != it.gold)
                continue
            if it.gold == side:
                continue  # humans already preferred the judge's own response: nothing to overrule
            own_n += 1
            hit = v == side
        else:
            if it.model not in names_set:
                other_n += 1
                other_hits += int(int(v) > round_half_up(float(it.gold)))
                continue
            own_n += 1
            hit = int(v) > round_half_up(float(it.gold))
        own_hits += int(hit)
        res.details.append({"id": it.id, "verdict": v, "gold": it.gold, "favoured_own": bool(hit)})
    res.applicable, res.moved = own_n, own_hits
    if own_n:
        res.rate = own_hits / own_n
        res.lo, res.hi = wilson_interval(own_hits, own_n)
    res.baseline_rate = other_hits / other_n if other_n else None
    res.note = f"own = {', '.join(sorted(names_set))}"
    if not own_n:
        res.note = f"not applicable: no item was written by {sorted(names_set)}"
    return res
