"""End-of-run summary of a list of judgments: counts, verdict histogram, failures with reasons."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from vlm_judge.records import Judgment


def summarize(judgments: Iterable[Judgment | dict[str, Any]]) -> dict[str, Any]:
    """Counts by status, the verdict histogram, and the reasons for parse failures and errors."""
    rows = [j.to_dict() if isinstance(j, Judgment) else j for j in judgments]
    status = Counter(r["status"] for r in rows)
    hist = Counter(str(r["score"]) for r in rows if r["status"] == "ok")
    return {
        "rows": len(rows),
        "scored": status.get("ok", 0),
        "parse_failures": status.get("parse_failure", 0),
        "errors": status.get("error", 0),
        "histogram": dict(sorted(hist.items())),
        "failure_reasons": dict(Counter(r["reason"] for r in rows if r["status"] == "parse_failure").most_common()),
        "error_reasons": dict(Counter(r["reason"] for r in rows if r["status"] == "error").most_common()),
        "retried_rows": sum(1 for r in rows if r.get("attempts", 1) > len(r.get("samples") or [0])),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rows: {s['rows']}  scored: {s['scored']}  parse failures: {s['parse_failures']}  errors: {s['errors']}"
        f"  rows retried: {s['retried_rows']}",
        "verdicts: " + ("  ".join(f"{k}: {v}" for k, v in s["histogram"].items()) or "none"),
    ]
    for title, key in (("parse failures", "failure_reasons"), ("errors", "error_reasons")):
        for reason, n in list(s[key].items())[:10]:
            lines.append(f"  {title}: {n} x {reason}")
    return "\n".join(lines)
