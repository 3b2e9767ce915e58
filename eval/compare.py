"""Compare judges on the same items: text judges (given a caption) vs vision judges (given the
image), side by side per instruction category, with the paired bootstrap test.

`text_requests` builds what a text judge sees; `side_by_side` and `paired_tests` compare any
set of judges that graded the same items.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

from eval import metrics as M
from eval.agreement import PRIMARY, PRIMARY_FN
from eval.benchmarks import BenchItem
from text_judge import caption_bridge
from vlm_judge.records import JudgeRequest, Judgment


def text_requests(
    items: Sequence[BenchItem], model_captions: dict[str, str] | None = None
) -> tuple[list[JudgeRequest | None], dict[str, str]]:
    """What a text judge sees for each item: its caption in place of the image.

    Captions come from `model_captions` ({image_key: caption}, from a named captioning model)
    when given, else from the benchmark. An item with an image and no caption gets None and a
    reason, so it shows up as an error for the text judge instead of being judged blind.
    """
    out: list[JudgeRequest | None] = []
    missing: dict[str, str] = {}
    pending: list[tuple[int, JudgeRequest, str]] = []
    for k, it in enumerate(items):
        req = it.request
        if not req.images:
            out.append(req)
            continue
        cap = model_captions.get(req.image_key) if model_captions is not None else it.caption
        if not cap or not cap.strip():
            out.append(None)
            src = "the captioning model" if model_captions is not None else "the benchmark"
            missing[it.id] = f"no caption for this image from {src}"
            continue
        out.append(None)
        pending.append((k, req, cap))
    bridged = caption_bridge([r for _, r, _ in pending], [c for _, _, c in pending])
    for (k, _, _), b in zip(pending, bridged):
        out[k] = b
    return out, missing


def _primary(metrics: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """The mode's primary metric with its CI, n and unreadable rate; None if the mode is absent."""
    block = metrics.get(mode)
    if not block:
        return None
    v = block.get(PRIMARY[mode])
    return {**(v if isinstance(v, dict) else {}), "parse_failure_rate": block.get("parse_failure_rate"),
            "n_items": block.get("n")}


def side_by_side(metrics_by_judge: dict[str, dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Rows (category, judge, primary metric with CI, n, parse-failure rate), 'all' first."""
    rows = []
    cats: list[str] = []
    for m in metrics_by_judge.values():
        for c in (m.get("by_category") or {}):
            if c not in cats:
                cats.append(c)
    for cat in ["all", *sorted(cats)]:
        for label, m in metrics_by_judge.items():
            block = m.get("overall", {}) if cat == "all" else (m.get("by_category") or {}).get(cat, {})
            p = _primary(block, mode)
            if p is not None:
                rows.append({"category": cat, "judge": label, "metric": PRIMARY[mode], **p})
    return rows


def paired_tests(
    items: Sequence[BenchItem],
    judgments_by_judge: dict[str, Sequence[Judgment]],
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """For every pair of judges, per mode and per category: is A's agreement with humans higher
    than B's on the items both judged? (difference, 95% CI, two-sided bootstrap p-value)"""
    out = []
    labels = list(judgments_by_judge)
    cats = sorted({it.category for it in items if it.category})
    for a, b in combinations(labels, 2):
        for mode in ("absolute", "relative"):
            for cat in ["all", *(cats if len(cats) > 1 else [])]:
                idx = [k for k, it in enumerate(items) if it.mode == mode and (cat == "all" or it.category == cat)]
                if len(idx) < 2:
                    continue
                gold = [float(items[k].gold) if mode == "absolute" else items[k].gold for k in idx]
                pa = [judgments_by_judge[a][k].score for k in idx]
                pb = [judgments_by_judge[b][k].score for k in idx]
                r = M.paired_bootstrap(PRIMARY_FN[mode], gold, pa, pb, n_boot=n_boot, seed=seed)
                out.append({"judge_a": a, "judge_b": b, "mode": mode, "category": cat, "metric": PRIMARY[mode], **r})
    return out
