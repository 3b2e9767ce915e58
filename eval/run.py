"""Run a judge over requests with a resumable cache, and name judges on the command line.

Judgments are appended to a JSONL file as each batch finishes. A re-run reuses a cached judgment
only when the request it was made for is unchanged (a fingerprint of the request), so resuming
never duplicates rows and an edited benchmark is re-judged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_judge.card import default_kind
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.scorer import Judge


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


def fingerprint(request: JudgeRequest, extra: str = "") -> str:
    """Identity of what the judge was shown; a cached judgment is reused only on a match."""
    parts = [request.id, request.mode, request.instruction, request.response, request.response_b or "",
             request.reference_answer or "", request.rubric.to_text(), request.image_key, extra]
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def judgment_from_dict(d: dict[str, Any]) -> Judgment:
    known = set(Judgment.__dataclass_fields__)
    return Judgment(**{k: v for k, v in d.items() if k in known})


def judge_cached(
    judge: Judge,
    requests: Sequence[JudgeRequest],
    cache: str | Path | None = None,
    chunk: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[Judgment]:
    """Grade `requests` (ids must be unique), reusing and appending to the JSONL `cache`."""
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique within one run")
    # the judge's settings are part of the identity: a changed template or budget re-judges
    c = judge.config
    setting = json.dumps([c.template, c.n_samples, c.swap, c.aggregate, c.max_parse_retries,
                          c.params.max_new_tokens, c.params.temperature, c.params.seed])
    fps = [fingerprint(r, setting) for r in requests]
    done: dict[str, Judgment] = {}
    path = Path(cache) if cache else None
    if path and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by an interrupted run: judge that row again
            done[d.pop("_fp", "")] = judgment_from_dict(d)
    todo = [k for k, fp in enumerate(fps) if fp not in done]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), chunk):
        idx = todo[start : start + chunk]
        got = judge.grade([requests[k] for k in idx])
        lines = []
        for k, j in zip(idx, got):
            done[fps[k]] = j
            lines.append(json.dumps({**j.to_dict(), "_fp": fps[k]}))
        if path:
            # a run killed mid-write leaves a partial last line: start ours on a fresh line
            broken = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            with path.open("a", encoding="utf-8") as f:
                f.write(("\n" if broken else "") + "\n".join(lines) + "\n")
        if progress:
            progress(min(start + chunk, len(todo)), len(todo))
    return [done[fp] for fp in fps]


def error_judgment(request: JudgeRequest, judge: str, reason: str) -> Judgment:
    """A row the judge could not be asked about (e.g. no caption for a text judge): an error, not a score."""
    return Judgment(id=request.id, mode=request.mode, score=None, status="error", reason=reason, judge=judge)
