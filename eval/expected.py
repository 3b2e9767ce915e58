"""Score from probabilities (G-Eval style): the expected score under the judge's own distribution
over '1'..'5' at the verdict position, beside the sampled integer.

The continuation is the judge's output exactly as written up to the score digit after the last
'[RESULT]' marker. When the output has no marker (it may still have parsed from another form, or
not at all), the marker is appended after the output: the number is then the judge's distribution
at a forced verdict, and the report counts such rows separately (`forced`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vlm_judge.backends import ScoresTokens
from vlm_judge.prompts import get_template, render
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.scorer import Judge

CANDIDATES = ("1", "2", "3", "4", "5")
_MARKER = re.compile(r"\[RESULT\][ \t]*:?[ \t]*", re.I)


def continuation(raw_output: str) -> tuple[str, bool]:
    """(text before the score digit, whether the marker had to be added)."""
    last = None
    for m in _MARKER.finditer(raw_output):
        last = m
    if last is not None:
        return raw_output[: last.end()], False
    return raw_output.rstrip() + "\n[RESULT] ", True


def supports_probs(judge: Judge) -> bool:
    return isinstance(judge.backend, ScoresTokens) and callable(getattr(judge.backend, "next_token_probs", None))


def expected_scores(
    judge: Judge, requests: Sequence[JudgeRequest], judgments: Sequence[Judgment], batch_size: int = 8
) -> list[dict[str, Any] | None]:
    """Per absolute request: {'expected', 'mass', 'probs', 'forced'}; None for relative requests and
    for rows with no output (a backend error) or no probability mass on the score tokens."""
    if not supports_probs(judge):
        raise TypeError(f"judge {judge.name!r}: its backend does not implement next_token_probs (ScoresTokens)")
    out: list[dict[str, Any] | None] = [None] * len(requests)
    todo = [k for k, (r, j) in enumerate(zip(requests, judgments)) if r.mode == "absolute" and j.raw_output]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        prompts = [render(requests[k], get_template(judge.config.template, "absolute")) for k in idx]
        conts = [continuation(judgments[k].raw_output) for k in idx]
        probs = judge.backend.next_token_probs(prompts, [c for c, _ in conts], list(CANDIDATES))  # type: ignore[attr-defined]
        for k, (_, forced), p in zip(idx, conts, probs):
            mass = sum(float(p.get(c, 0.0)) for c in CANDIDATES)
            if mass <= 0:
                continue
            exp = sum(int(c) * float(p.get(c, 0.0)) for c in CANDIDATES) / mass
            out[k] = {"expected": exp, "mass": mass, "probs": {c: float(p.get(c, 0.0)) for c in CANDIDATES},
                      "forced": forced}
    return out
