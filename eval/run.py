"""Run a judge over requests with a resumable cache, and name judges on the command line.

The cache is a `vlm_judge.store.JudgmentStore` keyed by fingerprint: a cached judgment is reused
only for the same request (image bytes included) and the same judge settings, errors are judged
again on a re-run, and the file is locked while a run writes to it. The rules are in that module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlm_judge.card import default_kind
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.store import judge_cached

__all__ = ["JudgeSpec", "error_judgment", "judge_cached", "parse_judge"]


@dataclass(frozen=True)
class JudgeSpec:
    """A judge named on the command line: `[text:|vision:]NAME_OR_PATH[@BACKEND]`."""

    name: str
    """The model name or judge folder, as given."""
    kind: str
    """'vision' (sees images) or 'text' (sees a caption instead)."""
    backend: str | None = None
    """This judge's backend; None: the run's --backend, else the judge card's, else Judge.load's default."""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}" + (f"@{self.backend}" if self.backend else "")


def parse_judge(spec: str) -> JudgeSpec:
    """'text:path' / 'vision:path' / 'path', each optionally '@backend'. Without a prefix the kind
    comes from the judge folder's card ('kind'), else 'vision'."""
    backend = None
    if "@" in spec and not Path(spec).exists():
        spec, backend = spec.rsplit("@", 1)
    for kind in ("text", "vision"):
        if spec.startswith(kind + ":"):
            return JudgeSpec(spec[len(kind) + 1 :], kind, backend)
    return JudgeSpec(spec, default_kind(spec), backend)


def error_judgment(request: JudgeRequest, judge: str, reason: str) -> Judgment:
    """A row the judge could not be asked about (e.g. no caption for a text judge): an error, not a score."""
    return Judgment(id=request.id, mode=request.mode, score=None, status="error", reason=reason, judge=judge)
