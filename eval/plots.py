"""PNG plots for the eval report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter(gold: Sequence[float], pred: Sequence[int | None], title: str, path: Path, seed: int = 0) -> Path:
    """Gold vs predicted score, both jittered so that stacked points on the 1..5 grid show."""
    plt = _plt()
    pairs = [(g, p) for g, p in zip(gold, pred) if p is not None]
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if pairs:
        g = np.array([a for a, _ in pairs], float) + rng.uniform(-0.15, 0.15, len(pairs))
        p = np.array([b for _, b in pairs], float) + rng.uniform(-0.15, 0.15, len(pairs))
        ax.scatter(g, p, s=14, alpha=0.6)
    ax.plot([1, 5], [1, 5], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0.5, 5.5), ylim=(0.5, 5.5), xlabel="human score", ylabel="judge score", title=title[-50:])
    fail = sum(1 for p in pred if p is None)
    ax.text(0.6, 5.3, f"n={len(pairs)}  unreadable={fail}", fontsize=8, va="top")
    fig.subplots_adjust(left=0.14, bottom=0.12, right=0.97, top=0.92)  # fixed margins: tight_layout costs ~40%
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def confusion(gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[Any], title: str, path: Path) -> Path:
    """Counts of (human, judge) verdicts; unreadable judge verdicts get their own column."""
    plt = _plt()
    cols = [*labels, None]
    m = np.zeros((len(labels), len(cols)), int)
    for g, p in zip(gold, pred):
        if g in labels:
            m[list(labels).index(g), cols.index(p) if p in cols else len(cols) - 1] += 1
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), [str(c) if c is not None else "n/a" for c in cols])
    ax.set_yticks(range(len(labels)), [str(c) for c in labels])
    ax.set(xlabel="judge", ylabel="human (rounded)", title=title[-50:])
    fig.subplots_adjust(left=0.14, bottom=0.13, right=0.97, top=0.92)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def grouped_bars(
    groups: Sequence[str], series: dict[str, Sequence[tuple[float | None, float | None, float | None]]],
    ylabel: str, title: str, path: Path, ylim: tuple[float, float] | None = None,
) -> Path:
    """Bars per group (category or probe) and series (judge), with (value, lo, hi) error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (name, vals) in enumerate(series.items()):
        v = np.array([a if a is not None else np.nan for a, _, _ in vals], float)
        lo = np.array([a - b if a is not None and b is not None else 0 for a, b, _ in vals], float)
        hi = np.array([c - a if a is not None and c is not None else 0 for a, _, c in vals], float)
        pos = x + (k - (len(series) - 1) / 2) * width
        ok = ~np.isnan(v)
        # a percentile bootstrap interval need not contain the point estimate: clip the bar's whiskers
        bars = ax.bar(pos[ok], v[ok], width, yerr=[np.clip(lo[ok], 0, None), np.clip(hi[ok], 0, None)], capsize=3,
                      label=name)
        for xp in pos[~ok]:  # no value is not a value of 0: say so where the bar would be
            ax.text(xp, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90,
                    color=bars.patches[0].get_facecolor() if bars.patches else "grey")
    ax.set_xticks(x, list(groups), rotation=20, ha="right")
    ax.axhline(0, color="black", lw=0.6)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
