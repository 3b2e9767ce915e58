"""Read the verdict out of a judge's output.

The parser binds to the **last** verdict in the output (a judge may restate the rubric or change
its mind while writing feedback), accepts the forms judges actually write, and when it cannot
read a verdict it says why instead of guessing a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlm_judge.records import Mode, Verdict

# A number, not the start of a range ("1-5", "1 to 5", "1 or 2": the prompt's own wording when echoed).
_NUM = r"\(?\s*(-?\d+(?:\.\d+)?)\s*\)?(?!\s*(?:-|\u2013|to|or)\s*\d)"
# Forms of an absolute verdict. Each captures the number. Deliberately NOT matched: the rubric's
# own "Score 3: ..." lines (number before the colon) and prose like "a score of 5" from the task
# description, which a judge often echoes.
_ABS_PATTERNS = [
    re.compile(r"\[RESULT\]\s*:?\s*(?:score\s*:?\s*)?" + _NUM, re.I),
    re.compile(r"(?:so\s+)?(?:the\s+)?overall\s+score\s+(?:is|of|=|:)\s*:?\s*" + _NUM, re.I),
    re.compile(r"(?<![\w\[])(?:final\s+)?score\s*[:=]\s*" + _NUM + r"(?!\s*/\s*(?:10|100)\b)(?!\s*:)", re.I),
    re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*/\s*5\b"),
]
_REL_PATTERNS = [
    # not "[RESULT] (A or B)": the prompt's format line, echoed
    re.compile(r"\[RESULT\]\s*:?\s*\(?\s*(?:response\s+)?\b(A|B|tie)\b(?!\s*(?:or|/)\s*\b(?:A|B)\b)\s*\)?", re.I),
    re.compile(r"(?:so\s+)?(?:the\s+)?better\s+response\s+is\s+(?:response\s+)?\(?\b(A|B)\b", re.I),
    re.compile(r"(?:winner|verdict)\s*:\s*(?:response\s+)?\(?\b(A|B|tie)\b", re.I),
]
# A verdict marker with nothing readable after it, e.g. output cut off at "[RESULT]".
_DANGLING = re.compile(r"\[RESULT\]\s*$", re.I)
# Trailing verdict sentences removed from the feedback text.
_TAIL = re.compile(
    r"(\s*(So\s+the\s+(overall\s+score|better\s+response)\s+is\s+\S+?\.?|\[RESULT\][^\n]*))+\s*$", re.I
)


@dataclass(frozen=True)
class ParseResult:
    """A parsed output: the feedback, the verdict (None if unreadable) and why not."""

    feedback: str
    verdict: Verdict
    ok: bool
    reason: str = ""


def _last_match(text: str, patterns: list[re.Pattern[str]]) -> re.Match[str] | None:
    best: re.Match[str] | None = None
    for pat in patterns:
        for m in pat.finditer(text):
            if best is None or m.start() > best.start():
                best = m
    return best


def _feedback(text: str, end: int) -> str:
    fb = text[:end]
    fb = _TAIL.sub("", fb).strip()
    fb = re.sub(r"^\s*(###\s*)?Feedback\s*:\s*", "", fb, flags=re.I)
    return fb.strip()


def parse_output(text: str | None, mode: Mode = "absolute") -> ParseResult:
    """Parse a judge output in the given mode. Never raises on model output."""
    if text is None or not text.strip():
        return ParseResult("", None, False, "empty output")
    if mode == "absolute":
        m = _last_match(text, _ABS_PATTERNS)
        if m is None:
            why = "output ends at '[RESULT]' with no score" if _DANGLING.search(text) else "no score found"
            return ParseResult(_feedback(text, len(text)), None, False, why)
        raw = m.group(1)
        value = float(raw)
        if value != int(value):
            return ParseResult(_feedback(text, m.start()), None, False, f"score {raw} is not an integer")
        score = int(value)
        if not 1 <= score <= 5:
            return ParseResult(_feedback(text, m.start()), None, False, f"score {score} is outside 1..5")
        return ParseResult(_feedback(text, m.start()), score, True)
    if mode == "relative":
        m = _last_match(text, _REL_PATTERNS)
        if m is None:
            why = "output ends at '[RESULT]' with no verdict" if _DANGLING.search(text) else "no A/B verdict found"
            return ParseResult(_feedback(text, len(text)), None, False, why)
        v = m.group(1)
        verdict: Verdict = "tie" if v.lower() == "tie" else v.upper()  # type: ignore[assignment]
        return ParseResult(_feedback(text, m.start()), verdict, True)
    raise ValueError(f"mode must be 'absolute' or 'relative', got {mode!r}")
