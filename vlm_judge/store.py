"""The judgment store: one JSONL file of judgments that a re-run resumes from. `vlm-judge score`
(its --out), `vlm-judge eval` (the cache in its report folder) and the Python API use it.

Resume semantics (the one place they are written down):

- **Fingerprint.** Every stored judgment carries a `fingerprint`: a hash of everything that decides
  it. That is the request (id, mode, instruction, response(s), reference answer, rubric text, and
  the *bytes* of each image, so a replaced picture at the same path counts as a change), the judge's
  name, the template's name *and* its text, the generation settings (max_new_tokens, temperature,
  top_p, seed, stop, n_samples, aggregate, swap, parse retries and their temperature) and
  `PROMPT_FORMAT_VERSION`. The package version is not part of it: a release that does not change
  what the judge is shown keeps every judgment; a release that does bumps `PROMPT_FORMAT_VERSION`.
  Batch size and the backend (hf, vllm or a server running the same model; device, concurrency,
  timeouts) decide nothing about what the judge is asked, and are left out.
- **What is reused.** A stored judgment is reused only when its fingerprint matches and its status
  is final: 'ok' or 'parse_failure' (a judge that writes no verdict is an answer too). An 'error'
  is never final: a re-run asks the judge again (after an outage, exactly the errored rows are
  re-judged). A changed row or setting is simply judged again; its new line supersedes the old.
- **Crash safety.** Lines are appended and flushed as each chunk finishes, so a killed run loses
  at most the chunk in flight. A torn last line is handled by the one rule of `vlm_judge.jsonl`.
- **Compaction.** At the end the file is rewritten atomically (a private temporary file, then a
  rename) with one line per key: the rows of this input in input order, then lines for other rows
  that were already there. Unreadable lines and superseded judgments are dropped.
- **One writer.** The store holds an exclusive lock on its file for as long as it is open. A second
  run on the same output is refused at once (`vlm_judge.jsonl.Locked`, a clear message and a
  non-zero exit from the commands) rather than waiting: a run that silently waits looks hung, and
  two runs interleaving their lines would each lose the other's judgments. The OS releases the lock
  when a process dies, so a killed run leaves no stale lock.

`score` keys its file by row id (one line per row; the latest line for an id is the row's answer),
so the file reads as the output. The eval cache keys by fingerprint, so one cache holds the
judgments of several settings side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_judge.jsonl import BadLine, JsonlAppender, exclusive_lock, iter_jsonl, write_jsonl_atomic
from vlm_judge.records import ImageRef, JudgeRequest, Judgment

if TYPE_CHECKING:  # the scorer imports nothing of this module's callers; only the type is needed
    from vlm_judge.scorer import Judge

PROMPT_FORMAT_VERSION = 1
"""Bump when a release changes what a judge is shown for the same request and template (the
renderer, the chat layout, image handling): stored judgments then no longer match and are redone."""

FINGERPRINT = "fingerprint"
"""The field of a stored line that holds its fingerprint."""

FINAL = ("ok", "parse_failure")
"""Statuses a re-run keeps; 'error' is retried."""

_digests: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def image_digest(image: ImageRef) -> str:
    """sha1 of an image's encoded bytes (a file's memoised by path, size and mtime), so the same
    picture from a file or inline is the same image, and a replaced file is another one."""
    if image.path is None:
        return hashlib.sha1(image.data or b"").hexdigest()
    try:
        st = os.stat(image.path)
    except OSError:
        return "missing:" + str(Path(image.path).resolve())  # the request errors; retried anyway
    k = (str(Path(image.path).resolve()), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        if k in _digests:
            return _digests[k]
    with open(image.path, "rb") as f:
        d = hashlib.sha1(f.read()).hexdigest()
    with _digest_lock:
        _digests[k] = d
    return d


class Fingerprinter:
    """Fingerprints requests for one judge with its current settings (see the module docstring)."""

    def __init__(self, judge: Any) -> None:
        from vlm_judge.prompts import get_template

        c = judge.config
        self._template = lambda mode: get_template(c.template, mode)
        self.template_name = self._template("absolute").name
        self._settings = {
            "prompt_format": PROMPT_FORMAT_VERSION, "judge": judge.name, "template": self.template_name,
            "params": asdict(c.params), "n_samples": c.n_samples, "aggregate": c.aggregate, "swap": c.swap,
            "retries": c.max_parse_retries, "retry_temperature": c.retry_temperature,
        }
        self._template_sha: dict[str, str] = {}

    def _template_hash(self, mode: str) -> str:
        if mode not in self._template_sha:
            text = json.dumps(self._template(mode).to_dict(), sort_keys=True)
            self._template_sha[mode] = hashlib.sha256(text.encode()).hexdigest()
        return self._template_sha[mode]

    def __call__(self, request: JudgeRequest) -> str:
        parts = [self._settings, self._template_hash(request.mode), request.id, request.mode, request.instruction,
                 request.response, request.response_b, request.reference_answer, request.rubric.to_text(),
                 [image_digest(im) for im in request.images]]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def to_judgment(line: dict[str, Any]) -> Judgment:
    """A stored line back as a Judgment (the store's own fields dropped)."""
    known = set(Judgment.__dataclass_fields__)
    return Judgment(**{k: v for k, v in line.items() if k in known})


class JudgmentStore:
    """One locked JSONL file of judgments, keyed by `key` ('id', or FINGERPRINT for a cache).
    Use as a context manager; see the module docstring for what is reused."""

    def __init__(self, path: str | Path, key: str = "id", what: str = "run") -> None:
        self.path = Path(path)
        self.key = key
        self.what = what
        self.bad_lines = 0
        """Unreadable lines found when opening (dropped by `compact`)."""
        self._lines: dict[str, dict[str, Any]] = {}
        self._stack = contextlib.ExitStack()
        self._out: JsonlAppender | None = None

    def __enter__(self) -> JudgmentStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(exclusive_lock(self.path, self.what))
            if self.path.is_file():
                for _, obj in iter_jsonl(self.path):
                    if isinstance(obj, BadLine) or obj.get(self.key) is None:
                        self.bad_lines += 1
                    else:
                        self._put(obj)
            self._out = stack.enter_context(JsonlAppender(self.path))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _put(self, line: dict[str, Any]) -> None:
        k = str(line[self.key])
        old = self._lines.get(k)
        if (old is not None and line.get("status") not in FINAL and old.get("status") in FINAL
                and line.get(FINGERPRINT) and old.get(FINGERPRINT) == line.get(FINGERPRINT)):
            return  # an error never replaces a judgment of the very same request and settings
        self._lines[k] = line

    def reusable(self, rid: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored line to reuse for this row, or None when it must be judged (again)."""
        line = self._lines.get(fingerprint if self.key == FINGERPRINT else str(rid))
        if line is None or line.get(FINGERPRINT) != fingerprint or line.get("status") not in FINAL:
            return None
        return line

    def lines(self) -> list[dict[str, Any]]:
        """The current line per key, in the order keys first appeared."""
        return list(self._lines.values())

    def add(self, lines: list[dict[str, Any]]) -> None:
        """Append lines (written and flushed together) and make them current."""
        if self._out is None:
            raise RuntimeError("the store is not open")
        self._out.write(lines)
        for line in lines:
            self._put(line)

    def compact(self, order: list[str] | None = None) -> list[dict[str, Any]]:
        """Rewrite the file atomically with one line per key: `order`'s keys first, in that order,
        then the others as they first appeared. Returns the lines of `order` (all when None)."""
        keys = list(self._lines) if order is None else [k for k in order if k in self._lines]
        first = set(keys)
        rows = [self._lines[k] for k in keys]
        if self._out is not None:
            self._out.close()
        write_jsonl_atomic(self.path, rows + [v for k, v in self._lines.items() if k not in first])
        self._out = self._stack.enter_context(JsonlAppender(self.path))  # the old handle points at the replaced file
        self.bad_lines = 0
        return rows


def judge_cached(
    judge: Judge,
    requests: Sequence[JudgeRequest],
    cache: str | Path | None = None,
    chunk: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[Judgment]:
    """Grade `requests` (ids must be unique), reusing and appending to the JSONL `cache` (keyed by
    fingerprint, so one file may hold several settings' judgments; None: no file). Chunks go through
    `Judge.grade_chunks`, so a server sees its full concurrency. Used by `vlm-judge eval` and by
    the in-training evaluation."""
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


__all__ = ["judge_cached", "FINAL", "FINGERPRINT", "PROMPT_FORMAT_VERSION", "Fingerprinter", "JudgmentStore", "image_digest",
           "to_judgment"]
