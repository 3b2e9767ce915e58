"""The scorer: one Judge for text and image requests, absolute and relative grading.

What it adds over calling a backend: batching with requests grouped by image (so an image is
decoded and preprocessed once per batch), bounded retries of parse failures (counted and
reported), position swap for relative grading (disagreement between the two orders is a tie),
n samples per request with mean/majority aggregation, and seeds for reproducibility.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vlm_judge import __version__, card
from vlm_judge.backends import Backend, Generation, GenerationParams, get_backend
from vlm_judge.backends.base import SchedulesItself
from vlm_judge.images import resolve_image
from vlm_judge.parse import parse_output
from vlm_judge.presets import locate_judge
from vlm_judge.prompts import JudgeTemplate, get_template, render, swapped
from vlm_judge.records import JudgeRequest, Judgment, RecordError, Rubric, Verdict

JUDGE_CARD = card.CARD_FILE
"""File in a judge folder naming its backend, template and kind (read and written by vlm_judge.card)."""


@dataclass
class ScorerConfig:
    """How the scorer runs. Bad combinations fail at construction."""

    template: str = "default"
    """A registered template name ('default', 'prefix') or a template file path."""
    batch_size: int = 8
    """Prompts per backend call."""
    max_parse_retries: int = 2
    """Extra generations for a request whose output did not parse (or errored)."""
    retry_temperature: float = 0.7
    """Sampling temperature for retries when decoding is greedy (a greedy retry would repeat itself)."""
    n_samples: int = 1
    """Generations per request; more than one needs temperature > 0."""
    aggregate: Literal["mean", "majority"] = "mean"
    """How n samples become one score: rounded mean, or the most frequent verdict."""
    swap: bool = True
    """Relative mode: judge both orders and call a disagreement a tie."""
    params: GenerationParams = field(default_factory=GenerationParams)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_parse_retries < 0:
            raise ValueError("max_parse_retries must be >= 0")
        if self.n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        if self.n_samples > 1 and self.params.temperature <= 0:
            raise ValueError("n_samples > 1 needs params.temperature > 0 (greedy samples are identical)")
        if self.aggregate not in ("mean", "majority"):
            raise ValueError("aggregate must be 'mean' or 'majority'")


@dataclass
class _Job:
    req_index: int
    sample: int
    swapped: bool
    request: JudgeRequest
    attempts: int = 0
    text: str | None = None
    feedback: str = ""
    verdict: Verdict = None
    status: str = "pending"
    reason: str = ""
    final: bool = False
    """Another attempt cannot help (a client error, or a server the backend already retried)."""


def _as_rubric(r: Rubric | dict | str) -> Rubric:
    if isinstance(r, Rubric):
        return r
    if isinstance(r, dict):
        return Rubric.from_dict(r)
    return Rubric.from_text(r)


def _per_row(value: Any, n: int, name: str) -> list[Any]:
    """Broadcast a single value to n rows, or check a list has n entries.

    `images` is per row when it is a list: one entry per row (None, one image, or a list of
    images). Only for a single row may a flat list hold that row's several images.
    """
    if isinstance(value, (list, tuple)):
        if name == "images" and n == 1 and len(value) != 1 and not any(isinstance(v, (list, tuple)) for v in value):
            return [list(value)]
        if len(value) != n:
            hint = " (give one entry per row; a row with several images takes a list)" if name == "images" else ""
            raise ValueError(f"{name} has {len(value)} entries for {n} rows{hint}")
        return list(value)
    return [value] * n


def _images(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(resolve_image(v) for v in value)
    return (resolve_image(value),)


class Judge:
    """Grades responses with a backend. Batch-first: every method takes lists."""

    def __init__(self, backend: Backend, config: ScorerConfig | None = None, name: str | None = None) -> None:
        self.backend = backend
        self.config = config or ScorerConfig()
        self.name = name or getattr(backend, "name", "judge")

    @classmethod
    def load(
        cls,
        name_or_path: str,
        backend: str | None = None,
        config: ScorerConfig | None = None,
        **backend_kwargs: Any,
    ) -> Judge:
        """Load a judge: 'mock', a judge folder written by `vlm-judge train` (its card says how),
        a transformers model folder or name ('hf'), or a model served by an OpenAI-compatible
        server (backend='openai', base_url=...). A preset name (`vlm_judge.presets`) loads its
        published weights from the preset folder or the local model cache, with its template; a name
        that is none of these fails at once (JudgeNotFound), before any model code is imported."""
        located = locate_judge(name_or_path, backend,
                               served=bool(backend_kwargs.get("base_url") or backend_kwargs.get("base_urls")))
        name_or_path = located.path
        if config is None and located.template:
            config = ScorerConfig(template=located.template)
        judge_card = card.load_card(name_or_path)
        if backend is None:
            served = bool(backend_kwargs.get("base_url") or backend_kwargs.get("base_urls"))
            backend = card.default_backend(name_or_path, judge_card, base_urls=served)
        config = config or ScorerConfig(template=judge_card.get("template", "default"))
        # every backend takes the model as `model`; the mock also records it as its name
        be = get_backend(backend, model=name_or_path, **backend_kwargs)
        return cls(be, config, name=located.name)

    # ---- public grading API -------------------------------------------------------------

    def absolute_grade(
        self,
        instructions: Sequence[str] | str,
        responses: Sequence[str] | str,
        rubric: Rubric | dict | str | Sequence[Rubric | dict | str],
        reference_answers: Sequence[str | None] | str | None = None,
        images: Any = None,
        ids: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Judgment]:
        """Score each response 1..5 against the rubric. `images`: per row None, a path/bytes or a list."""
        instructions, responses = _listify(instructions), _listify(responses)
        n = len(instructions)
        rows = zip(
            instructions, _per_row(responses, n, "responses"), _per_row(rubric, n, "rubric"),
            _per_row(reference_answers, n, "reference_answers"), _per_row(images, n, "images"),
        )
        reqs = [
            self._row(_row_id(ids, k), "absolute", lambda rid, i=i, r=r, rb=rb, ref=ref, im=im: JudgeRequest(
                instruction=i, response=r, rubric=_as_rubric(rb), reference_answer=ref,
                images=_images(im), id=rid, mode="absolute",
            ))
            for k, (i, r, rb, ref, im) in enumerate(rows)
        ]
        return self._grade_valid(reqs, progress)

    def relative_grade(
        self,
        instructions: Sequence[str] | str,
        responses_a: Sequence[str] | str,
        responses_b: Sequence[str] | str,
        rubric: Rubric | dict | str | Sequence[Rubric | dict | str],
        reference_answers: Sequence[str | None] | str | None = None,
        images: Any = None,
        ids: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Judgment]:
        """Choose the better of two responses: 'A', 'B', or 'tie' when the two orders disagree."""
        instructions = _listify(instructions)
        n = len(instructions)
        rows = zip(
            instructions, _per_row(_listify(responses_a), n, "responses_a"),
            _per_row(_listify(responses_b), n, "responses_b"), _per_row(rubric, n, "rubric"),
            _per_row(reference_answers, n, "reference_answers"), _per_row(images, n, "images"),
        )
        reqs = [
            self._row(_row_id(ids, k), "relative", lambda rid, i=i, a=a, b=b, rb=rb, ref=ref, im=im: JudgeRequest(
                instruction=i, response=a, response_b=b, rubric=_as_rubric(rb), reference_answer=ref,
                images=_images(im), id=rid, mode="relative",
            ))
            for k, (i, a, b, rb, ref, im) in enumerate(rows)
        ]
        return self._grade_valid(reqs, progress)

    def _row(self, rid: str, mode: str, build: Callable[[str], JudgeRequest]) -> JudgeRequest | Judgment:
        """The request, or an error Judgment naming why this row is invalid (the others go on)."""
        try:
            return build(rid)
        except (RecordError, KeyError, TypeError) as e:
            reason = str(e) if isinstance(e, RecordError) else f"bad rubric: {type(e).__name__}: {e}"
            return Judgment(id=rid, mode=mode, score=None, status="error", reason=reason, attempts=0,  # type: ignore[arg-type]
                            judge=self.name, template=self._template(mode).name, version=__version__)

    def _grade_valid(self, items: list[JudgeRequest | Judgment], progress: Callable[[int], None] | None) -> list[Judgment]:
        graded = iter(self.grade([x for x in items if isinstance(x, JudgeRequest)], progress=progress))
        return [x if isinstance(x, Judgment) else next(graded) for x in items]

    def grade(self, requests: Sequence[JudgeRequest], progress: Callable[[int], None] | None = None) -> list[Judgment]:
        """Grade a mixed list of absolute and relative requests; one Judgment per request, in order.
        `progress(n)` is called with the number of rows newly finished after each backend call."""
        cfg = self.config
        jobs = [
            _Job(k, s, sw, swapped(req) if sw else req)
            for k, req in enumerate(requests)
            for s in range(cfg.n_samples)
            for sw in ((False, True) if req.mode == "relative" and cfg.swap else (False,))
        ]
        by_row: dict[int, list[_Job]] = {}
        for j in jobs:
            by_row.setdefault(j.req_index, []).append(j)
        reported: set[int] = set()

        def report(last: bool) -> None:
            # a row is finished when every job of it parsed, or when no attempt is left
            done = [k for k, js in by_row.items() if k not in reported
                    and (last or all(j.status == "ok" or j.final for j in js))]
            reported.update(done)
            if progress and done:
                progress(len(done))

        pending = jobs
        for attempt in range(cfg.max_parse_retries + 1):
            if not pending:
                break
            self._run(pending, attempt, lambda: report(False))
            pending = [j for j in pending if j.status != "ok" and not j.final]
        report(True)
        return [self._aggregate(req, by_row[k]) for k, req in enumerate(requests)]

    def grade_chunks(self, chunks: Iterable[Sequence[JudgeRequest]], progress: Callable[[int], None] | None = None,
                     ) -> Iterator[tuple[Sequence[JudgeRequest], list[Judgment] | Exception]]:
        """Grade chunks of requests and yield (chunk, its judgments) as each finishes, possibly out of
        order: callers save a chunk as soon as it is done without the chunk size capping how many
        requests are in flight. With a backend that schedules itself and takes concurrent calls (an
        OpenAI-compatible server) enough chunks run at once to keep `max_in_flight` requests going,
        so a chunk's slowest request never idles the connections; otherwise chunks run one by one.
        A backend failure fails that chunk only (yielded as the exception). Chunks are read from
        `chunks` lazily, at most the window ahead, so memory stays bounded by the window."""
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            return
        window = 1
        if isinstance(self.backend, SchedulesItself) and self.backend.concurrent_calls > 1:
            # enough chunks to fill the backend, plus one queued so it never waits between chunks
            need = -(-self.backend.max_in_flight // max(1, len(first))) + 1
            window = max(1, min(self.backend.concurrent_calls, need))
        it = itertools.chain([first], it)
        lock = threading.Lock()

        def counted(n: int) -> None:
            with lock:
                progress(n)  # type: ignore[misc]

        def one(chunk: Sequence[JudgeRequest]) -> list[Judgment]:
            return self.grade(chunk, progress=counted if progress else None)

        if window == 1:
            for chunk in it:
                try:
                    yield chunk, one(chunk)
                except Exception as e:  # noqa: BLE001 - reported per chunk
                    yield chunk, e
            return
        pool = ThreadPoolExecutor(window, thread_name_prefix="vlm-judge-chunk")
        running: dict[Future, Sequence[JudgeRequest]] = {}
        try:
            for chunk in it:
                running[pool.submit(one, chunk)] = chunk
                if len(running) >= window:
                    break
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    chunk = running.pop(fut)
                    err = fut.exception()
                    if err is not None and not isinstance(err, Exception):
                        raise err
                    yield chunk, (err if err is not None else fut.result())  # type: ignore[misc]
                for chunk in it:
                    running[pool.submit(one, chunk)] = chunk
                    if len(running) >= window:
                        break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- internals -----------------------------------------------------------------------

    def _template(self, mode: str) -> JudgeTemplate:
        return get_template(self.config.template, mode)

    def _run(self, jobs: list[_Job], attempt: int, after_call: Callable[[], None] = lambda: None) -> None:
        cfg = self.config
        base = cfg.params
        prompts = [render(j.request, self._template(j.request.mode)) for j in jobs]
        # Group by image, then by prompt length: a batch then shares images (decoded once) and
        # pads little. The order is undone when results are stored back on each job.
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].request.image_key, len(prompts[i].user)))
        prefetch = getattr(self.backend, "prefetch", None)  # optional capability (see backends.base)
        # a backend that keeps its own requests in flight gets them all at once (see SchedulesItself)
        batch = max(1, len(order)) if isinstance(self.backend, SchedulesItself) else cfg.batch_size
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            if prefetch is not None:
                # the next batch's images load and preprocess while this batch generates
                prefetch([prompts[i] for i in order[start + batch : start + 2 * batch]])
            # one params object per batch: the seed varies with the attempt and sample, so a retry
            # is a new draw and sample s of a request is reproducible run to run
            groups: dict[tuple[int, float], list[int]] = {}
            for i in idx:
                groups.setdefault((jobs[i].sample, attempt), []).append(i)
            for (sample, _), members in groups.items():
                temp = base.temperature if (base.temperature > 0 or attempt == 0) else cfg.retry_temperature
                seed = None if base.seed is None else base.seed + 1000 * sample + attempt
                params = replace(base, temperature=temp, seed=seed)
                gens = self.backend.generate([prompts[i] for i in members], params)
                if len(gens) != len(members):
                    raise RuntimeError(f"backend returned {len(gens)} generations for {len(members)} prompts")
                for i, g in zip(members, gens):
                    job = jobs[i]
                    job.attempts += 1
                    job.text = g.text
                    if g.error is not None or g.text is None:
                        job.status, job.reason = "error", g.error or "backend returned no text"
                        job.final = not retry_helps(g)
                        continue
                    res = parse_output(g.text, job.request.mode)
                    job.feedback = res.feedback
                    if res.ok:
                        v = res.verdict
                        if job.swapped and v in ("A", "B"):
                            v = "B" if v == "A" else "A"  # map back to the caller's A/B
                        job.verdict, job.status, job.reason = v, "ok", ""
                    else:
                        job.verdict, job.status, job.reason = None, "parse_failure", res.reason
                after_call()

    def _aggregate(self, req: JudgeRequest, jobs: list[_Job]) -> Judgment:
        cfg = self.config
        first = jobs[0]
        common = dict(
            id=req.id, mode=req.mode, raw_output=first.text or "", feedback=first.feedback,
            attempts=sum(j.attempts for j in jobs), judge=self.name, template=self._template(req.mode).name,
            version=__version__,
        )
        failed = [j for j in jobs if j.status != "ok"]
        if failed:
            # any unreadable sample/order makes the row unreadable: a partial verdict would be a guess
            status = "error" if any(j.status == "error" for j in failed) else "parse_failure"
            why = "; ".join(sorted({(("swapped order: " if j.swapped else "") + j.reason) for j in failed}))
            return Judgment(score=None, status=status, reason=why, samples=[j.verdict for j in jobs], **common)
        if req.mode == "relative":
            per_sample = []
            for s in range(cfg.n_samples):
                vs = [j.verdict for j in jobs if j.sample == s]
                per_sample.append(vs[0] if len(set(vs)) == 1 else "tie")
            verdict = Counter(per_sample).most_common(1)[0][0]
            return Judgment(score=verdict, samples=[j.verdict for j in jobs], **common)
        scores = [int(j.verdict) for j in jobs]  # type: ignore[arg-type]
        mean = sum(scores) / len(scores)
        if cfg.aggregate == "majority":
            top = Counter(scores).most_common()
            best = [s for s, c in top if c == top[0][1]]
            score = min(best, key=lambda s: abs(s - mean))  # break ties toward the mean
        else:
            score = int(mean + 0.5)
        return Judgment(score=score, samples=scores, mean_score=mean if len(scores) > 1 else None, **common)


def retry_helps(g: Generation) -> bool:
    """Whether generating again may fix a failed generation. Not for a prompt the backend calls
    the prompt's fault (`client_error`: an undecodable image, over the context, a 4xx) nor one it
    marks `retryable: False` (the openai backend already retried a connection error or a 5xx):
    the parse-retry loop would only send the same failing request again."""
    return not g.extra.get("client_error") and g.extra.get("retryable") is not False


def _row_id(ids: Sequence[str] | None, k: int) -> str:
    return str(ids[k]) if ids else str(k)


def _listify(x: Sequence[str] | str) -> list[str]:
    return [x] if isinstance(x, str) else list(x)
