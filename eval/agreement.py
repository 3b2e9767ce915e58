"""One judge against the humans: every metric, overall and per instruction category.

Only items with a readable verdict enter a metric; how many did not is reported beside it
(`parse_failure_rate`, `n_scored` vs `n`), so an unreadable verdict is never a default score.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from eval import metrics as M
from eval.benchmarks import BenchItem
from vlm_judge.records import Judgment

PRIMARY = {"absolute": "spearman", "relative": "accuracy"}
"""The metric the paired test and the per-category bars use, per mode."""


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Pairwise accuracy under the default tie policy ('half')."""
    return M.pairwise_accuracy(gold, pred, ties="half")


PRIMARY_FN = {"absolute": M.spearman, "relative": accuracy}


def _clean(x: Any) -> Any:
    """NaN -> None so the JSON is valid and a missing value reads as missing."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _absolute(items: list[BenchItem], js: list[Judgment], expected: list[Any] | None, n_boot: int, seed: int) -> dict:
    gold = [float(it.gold) for it in items]
    pred = [j.score for j in js]
    g, p = M.drop_missing(gold, pred)
    out: dict[str, Any] = {"n": len(items), "n_scored": len(g), "parse_failure_rate": M.parse_failure_rate(pred)}
    # the expected score is read from probabilities, so it exists even where the text did not parse
    if expected is not None:
        ev = [e["expected"] if e else None for e in expected]
        ge, pe = M.drop_missing(gold, ev)
        if len(ge) >= 2:
            out["expected_score"] = {
                "n": len(ge),
                "forced": sum(1 for e in expected if e and e["forced"]),
                # little mass on '1'..'5' means the model was not about to write a score at all
                "mean_mass": sum(e["mass"] for e in expected if e) / len(ge),
                "spearman": M.with_ci(M.spearman, ge, pe, n_boot=n_boot, seed=seed),
                "pearson": M.with_ci(M.pearson, ge, pe, n_boot=n_boot, seed=seed),
            }
    if len(g) == 0:
        return out
    for name, fn in M.CORRELATIONS.items():
        out[name] = M.with_ci(fn, g, p, n_boot=n_boot, seed=seed)
    out["exact"] = M.with_ci(M.exact_agreement, g, p, n_boot=n_boot, seed=seed)
    out["within_one"] = M.with_ci(M.within_one, g, p, n_boot=n_boot, seed=seed)
    out["mae"] = M.mean_absolute_error(g, p)
    gr = [M.round_half_up(v) for v in g]
    out["kappa_quadratic"] = M.cohen_kappa(gr, [int(v) for v in p], weights="quadratic", labels=[1, 2, 3, 4, 5])
    # Krippendorff's alpha over every human rating plus the judge as one more coder; the humans
    # alone give the ceiling a judge can be expected to reach on this benchmark
    units = [[*(it.human_scores or [float(it.gold)]), j.score] for it, j in zip(items, js)]
    out["alpha_interval_with_humans"] = M.krippendorff_alpha(units, "interval")
    out["alpha_ordinal_with_humans"] = M.krippendorff_alpha(units, "ordinal")
    multi = [it.human_scores for it in items if len(it.human_scores) > 1]
    if multi:
        out["alpha_interval_humans_only"] = M.krippendorff_alpha(multi, "interval")
    return out


def _relative(items: list[BenchItem], js: list[Judgment], n_boot: int, seed: int) -> dict:
    gold = [str(it.gold) for it in items]
    pred = [j.score for j in js]
    g, p = M.drop_missing(gold, pred)
    out: dict[str, Any] = {"n": len(items), "n_scored": len(g), "parse_failure_rate": M.parse_failure_rate(pred),
                           "tie_policy": "half: human ties left out, a judge tie on a decided pair earns 0.5"}
    if len(g) == 0:
        return out
    out["accuracy"] = M.with_ci(accuracy, g, p, n_boot=n_boot, seed=seed)
    out["accuracy_strict"] = M.pairwise_accuracy(g, p, ties="strict")
    out["accuracy_three_way"] = M.pairwise_accuracy(g, p, ties="three_way")
    out["judge_tie_rate"] = sum(v == "tie" for v in p) / len(p)
    out["kappa"] = M.cohen_kappa(g, p, labels=["A", "B", "tie"])
    both = [(j.samples[0], j.samples[1]) for j in js if len(j.samples) >= 2]
    if both:
        out["position_consistency"] = M.position_consistency([a for a, _ in both], [b for _, b in both])
    return out


def _block(items: list[BenchItem], js: list[Judgment], expected: list[Any] | None, n_boot: int, seed: int) -> dict:
    out: dict[str, Any] = {}
    for mode in ("absolute", "relative"):
        idx = [k for k, it in enumerate(items) if it.mode == mode]
        if not idx:
            continue
        its, jj = [items[k] for k in idx], [js[k] for k in idx]
        if mode == "absolute":
            out[mode] = _absolute(its, jj, [expected[k] for k in idx] if expected else None, n_boot, seed)
        else:
            out[mode] = _relative(its, jj, n_boot, seed)
    return out


def judge_metrics(
    items: Sequence[BenchItem],
    judgments: Sequence[Judgment],
    expected: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics for one judge: overall, then per category (when the benchmark has categories)."""
    items, js = list(items), list(judgments)
    if len(items) != len(js):
        raise ValueError(f"{len(items)} items but {len(js)} judgments")
    exp = list(expected) if expected is not None else None
    status = defaultdict(int)
    reasons: dict[str, int] = defaultdict(int)
    for j in js:
        status[j.status] += 1
        if j.status != "ok":
            reasons[j.reason] += 1
    out: dict[str, Any] = {
        "n": len(items),
        "scored": status["ok"],
        "parse_failures": status["parse_failure"],
        "errors": status["error"],
        "parse_failure_rate": (len(js) - status["ok"]) / len(js) if js else None,
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:10]),
        "overall": _block(items, js, exp, n_boot, seed),
    }
    cats = sorted({it.category for it in items if it.category})
    if len(cats) > 1:
        out["by_category"] = {}
        for c in cats:
            idx = [k for k, it in enumerate(items) if it.category == c]
            out["by_category"][c] = _block([items[k] for k in idx], [js[k] for k in idx],
                                           [exp[k] for k in idx] if exp else None, n_boot, seed)
    return _clean(out)
