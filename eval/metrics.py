"""Agreement metrics between a judge and humans: pure functions over aligned lists.

Conventions shared by every function here:
- Inputs are aligned sequences (item k of one list is about the same item as item k of the other).
- A judge's unreadable verdict is `None`. Metrics never turn it into a default score: the
  `drop_missing` helper removes such items and the caller reports how many (`parse_failure_rate`).
- A metric that is undefined on its input (fewer than two items, a constant list) returns NaN,
  never 0, so an undefined value cannot pass for "no agreement".
- Bootstrap resampling is seeded: the same call gives the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Stat = Callable[..., float]

# ---------------------------------------------------------------- helpers


def drop_missing(*columns: Sequence[Any]) -> tuple[list[Any], ...]:
    """Keep only the positions where every column has a value (not None / NaN)."""
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"columns are not aligned: lengths {[len(c) for c in columns]}")

    def ok(v: Any) -> bool:
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    keep = [k for k in range(n) if all(ok(c[k]) for c in columns)]
    return tuple([c[k] for k in keep] for c in columns)


def _arr(x: Sequence[Any]) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _check(x: Sequence[Any], y: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    if len(x) != len(y):
        raise ValueError(f"lists are not aligned: {len(x)} vs {len(y)} items")
    return _arr(x), _arr(y)


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Average ranks (1-based); tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(_arr(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(float)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


# ---------------------------------------------------------------- correlations


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either list is constant or has fewer than two items."""
    a, b = _check(x, y)
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (the tie-corrected form)."""
    _check(x, y)
    return pearson(rankdata(x), rankdata(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list corrected), computed from the contingency table.

    Judge scores take five values, so counting concordant and discordant pairs cell by cell with
    2-D cumulative sums costs O(n + kx*ky) instead of O(n^2); that keeps bootstraps cheap.
    """
    a, b = _check(x, y)
    n = len(a)
    if n < 2:
        return float("nan")
    xv, xi = np.unique(a, return_inverse=True)
    yv, yi = np.unique(b, return_inverse=True)
    t = np.zeros((len(xv), len(yv)))
    np.add.at(t, (xi, yi), 1.0)
    # above[i, j] = sum of t[i' > i, j' > j]; below[i, j] = sum of t[i' > i, j' < j]
    rev = t[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]  # sum over i'>=i, j'>=j
    above = np.zeros_like(t)
    above[:-1, :-1] = rev[1:, 1:]
    rev_lo = t[::-1, :].cumsum(0)[::-1, :].cumsum(1)  # sum over i'>=i, j'<=j
    below = np.zeros_like(t)
    below[:-1, 1:] = rev_lo[1:, :-1]
    concordant = float((t * above).sum())
    discordant = float((t * below).sum())
    n0 = n * (n - 1) / 2
    tx = t.sum(1)
    ty = t.sum(0)
    n1 = float((tx * (tx - 1) / 2).sum())
    n2 = float((ty * (ty - 1) / 2).sum())
    den = math.sqrt((n0 - n1) * (n0 - n2))
    return (concordant - discordant) / den if den > 0 else float("nan")


CORRELATIONS: dict[str, Stat] = {"pearson": pearson, "spearman": spearman, "kendall": kendall_tau_b}


# ---------------------------------------------------------------- bootstrap


def _column(c: Sequence[Any]) -> np.ndarray:
    """A numeric column as floats (fast resampling), anything else (A/B/tie) as objects."""
    try:
        return np.asarray(c, dtype=float)
    except (TypeError, ValueError):
        return np.asarray(list(c), dtype=object)


def bootstrap_ci(
    stat: Stat,
    *columns: Sequence[Any],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(*columns)`, resampling items (rows) jointly.

    Resamples where the statistic is undefined (NaN, e.g. all-tied) are skipped; if fewer than
    half are usable the interval is (NaN, NaN) rather than a misleading narrow one.
    """
    n = len(columns[0])
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    cols = [_column(c) for c in columns]
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = stat(*[c[idx] for c in cols])
        if not (isinstance(v, float) and math.isnan(v)):
            vals.append(v)
    if len(vals) < n_boot / 2:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def with_ci(stat: Stat, *columns: Sequence[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """{'value', 'lo', 'hi', 'n'}: the statistic on the full data and its 95% bootstrap interval."""
    lo, hi = bootstrap_ci(stat, *columns, n_boot=n_boot, seed=seed)
    return {"value": stat(*columns), "lo": lo, "hi": hi, "n": len(columns[0])}


def paired_bootstrap(
    stat: Stat,
    gold: Sequence[Any],
    pred_a: Sequence[Any],
    pred_b: Sequence[Any],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Does judge A agree with humans better than judge B on the same items?

    Resamples items jointly (one index set for gold, A and B) and returns the observed
    difference `stat(gold, A) - stat(gold, B)`, its 95% percentile interval, and a two-sided
    bootstrap p-value (twice the smaller share of resampled differences on either side of 0).
    Items where either judge has no verdict are dropped first, so both are compared on one set.
    """
    g, a, b = drop_missing(gold, pred_a, pred_b)
    n = len(g)
    out = {"delta": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_value": float("nan"), "n": n}
    if n < 2:
        return out
    out["delta"] = stat(g, a) - stat(g, b)
    rng = np.random.default_rng(seed)
    ga, aa, ba = (_column(c) for c in (g, a, b))
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        gi = ga[idx]
        d = stat(gi, aa[idx]) - stat(gi, ba[idx])
        if not math.isnan(d):
            deltas.append(d)
    if len(deltas) < n_boot / 2:
        return out
    d = np.asarray(deltas)
    out["lo"], out["hi"] = (float(v) for v in np.quantile(d, [0.025, 0.975]))
    out["p_value"] = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    return out


# ---------------------------------------------------------------- agreement on the 1..5 scale


def round_half_up(v: float) -> int:
    """Round a (mean) gold score to the scale: 3.5 -> 4, not Python's banker's 4/2 rule."""
    return int(math.floor(v + 0.5))


def exact_agreement(gold: Sequence[float], pred: Sequence[float]) -> float:
    """Share of items where the judge's score equals the gold score (gold rounded half up)."""
    g, p = _check(gold, pred)
    if len(g) == 0:
        return float("nan")
    return float(np.mean(np.floor(g + 0.5) == np.floor(p + 0.5)))


def within_one(gold: Sequence[float], pred: Sequence[float]) -> float:
    """Share of items where the judge's score is at most one point from the gold score."""
    g, p = _check(gold, pred)
    if len(g) == 0:
        return float("nan")
    return float(np.mean(np.abs(g - p) <= 1.0 + 1e-9))


def mean_absolute_error(gold: Sequence[float], pred: Sequence[float]) -> float:
    g, p = _check(gold, pred)
    return float(np.mean(np.abs(g - p))) if len(g) else float("nan")


# ---------------------------------------------------------------- pairwise preferences

TIE_POLICIES = ("half", "strict", "three_way")


def pairwise_accuracy(gold: Sequence[str], pred: Sequence[str], ties: str = "half") -> float:
    """Agreement of A/B/tie verdicts with human preferences, under an explicit tie policy.

    - 'half' (default): items the humans called a tie are left out (there is no preference to
      recover); a judge's tie on a decided item earns half credit, the expected score of a coin flip.
    - 'strict': human ties left out; a judge's tie counts as wrong.
    - 'three_way': every item counts; the verdict must match exactly, tie included.
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    if len(gold) != len(pred):
        raise ValueError(f"lists are not aligned: {len(gold)} vs {len(pred)} items")
    credit = []
    for g, p in zip(gold, pred):
        if ties == "three_way":
            credit.append(1.0 if g == p else 0.0)
        elif g == "tie":
            continue
        elif p == g:
            credit.append(1.0)
        elif p == "tie":
            credit.append(0.5 if ties == "half" else 0.0)
        else:
            credit.append(0.0)
    return float(np.mean(credit)) if credit else float("nan")


def parse_failure_rate(pred: Sequence[Any]) -> float:
    """Share of items with no readable verdict (None)."""
    return float(np.mean([p is None for p in pred])) if len(pred) else float("nan")


def position_consistency(first_order: Sequence[Any], second_order: Sequence[Any]) -> float:
    """Share of pairs judged the same way in both orders.

    `second_order` must already be mapped back to the caller's A/B (the scorer does this and
    keeps both in `Judgment.samples`). Pairs where either order did not parse are left out.
    """
    a, b = drop_missing(first_order, second_order)
    return float(np.mean([x == y for x, y in zip(a, b)])) if a else float("nan")


# ---------------------------------------------------------------- chance-corrected agreement


def cohen_kappa(
    a: Sequence[Any], b: Sequence[Any], weights: str | None = None, labels: Sequence[Any] | None = None
) -> float:
    """Cohen's kappa between two raters; `weights` None (nominal), 'linear' or 'quadratic'.

    Weighted kappa needs ordered numeric labels; `labels` fixes the category set (default: the
    sorted union of both lists), which matters for weights when a score is never used.
    """
    if len(a) != len(b):
        raise ValueError(f"lists are not aligned: {len(a)} vs {len(b)} items")
    if not len(a):
        return float("nan")
    cats = list(labels) if labels is not None else sorted(set(a) | set(b), key=lambda v: (str(type(v)), v))
    index = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    obs = np.zeros((k, k))
    for x, y in zip(a, b):
        obs[index[x], index[y]] += 1
    obs /= obs.sum()
    exp = np.outer(obs.sum(1), obs.sum(0))
    if weights is None:
        w = 1.0 - np.eye(k)
    else:
        vals = np.asarray(cats, dtype=float)
        d = np.abs(vals[:, None] - vals[None, :])
        if weights == "linear":
            w = d
        elif weights == "quadratic":
            w = d**2
        else:
            raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    de = float((w * exp).sum())
    return 1.0 - float((w * obs).sum()) / de if de > 0 else float("nan")


def krippendorff_alpha(units: Sequence[Sequence[Any]], level: str = "interval") -> float:
    """Krippendorff's alpha for reliability data: one row per unit (item), one value per coder,
    None for a missing value. `level`: 'nominal', 'ordinal' or 'interval'.

    Built from the coincidence matrix (Krippendorff 2011): units with fewer than two values are
    not pairable and drop out; alpha = 1 - D_observed / D_expected.
    """
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be nominal, ordinal or interval, got {level!r}")
    rows = [[v for v in u if v is not None and not (isinstance(v, float) and math.isnan(v))] for u in units]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        return float("nan")
    values = sorted({v for r in rows for v in r})
    idx = {v: i for i, v in enumerate(values)}
    k = len(values)
    o = np.zeros((k, k))  # coincidence matrix
    for r in rows:
        m = len(r)
        counts = np.zeros(k)
        for v in r:
            counts[idx[v]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    nc = o.sum(1)
    n = nc.sum()
    if level == "nominal":
        delta = 1.0 - np.eye(k)
    elif level == "interval":
        v = np.asarray(values, dtype=float)
        delta = (v[:, None] - v[None, :]) ** 2
    else:  # ordinal: squared distance in cumulative marginal frequencies
        cum = np.cumsum(nc)
        delta = np.zeros((k, k))
        for c in range(k):
            for e in range(k):
                lo, hi = min(c, e), max(c, e)
                delta[c, e] = (cum[hi] - (cum[lo - 1] if lo > 0 else 0.0) - (nc[c] + nc[e]) / 2) ** 2
    d_o = float((o * delta).sum())
    d_e = float((np.outer(nc, nc) * delta).sum()) / (n - 1)
    return 1.0 - d_o / d_e if d_e > 0 else float("nan")


# ---------------------------------------------------------------- rates


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a rate (used for probe flip rates; sane at 0/n and n/n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))
