"""Run a judge over requests with a resumable cache, and name judges on the command line.

The cache is a `vlm_judge.store.JudgmentStore` keyed by fingerprint: a cached judgment is reused
only for the same request (image bytes included) and the same judge settings, errors are judged
again on a re-run, and the file is locked while a run writes to it. The rules are in that module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlm_judge.card import default_kind
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.scorer import Judge
from vlm_judge.store import FINGERPRINT, Fingerprinter, JudgmentStore, to_judgment


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
    fingerprint = Fingerprinter(judge)
    fps = [fingerprint(r) for r in requests]
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(JudgmentStore(cache, key=FINGERPRINT, what="eval")) if cache else None
        done: dict[str, Judgment] = {}
        for r, fp in zip(requests, fps):
            line = store.reusable(r.id, fp) if store else None
            if line is not None:
                done[fp] = to_judgment(line)
        todo = [k for k, fp in enumerate(fps) if fp not in done]
        index = {id(requests[k]): k for k in todo}
        finished = 0
        # chunks are saved as each finishes; with a server several are in flight (Judge.grade_chunks)
        chunks = ([requests[k] for k in todo[start : start + chunk]] for start in range(0, len(todo), chunk))
        for reqs, got in judge.grade_chunks(chunks):
            if isinstance(got, Exception):
                raise got
            idx = [index[id(r)] for r in reqs]
            for k, j in zip(idx, got):
                done[fps[k]] = j
            if store:
                store.add([{**j.to_dict(), FINGERPRINT: fps[k]} for k, j in zip(idx, got)])
            finished += len(reqs)
            if progress:
                progress(finished, len(todo))
        if store and (todo or store.bad_lines):
            store.compact()
    return [done[fp] for fp in fps]


def error_judgment(request: JudgeRequest, judge: str, reason: str) -> Judgment:
    """A row the judge could not be asked about (e.g. no caption for a text judge): an error, not a score."""
    return Judgment(id=request.id, mode=request.mode, score=None, status="error", reason=reason, judge=judge)
