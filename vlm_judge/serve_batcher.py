"""The micro-batcher behind `vlm-judge serve`: one worker thread owns the backend and runs the
queued requests in batches.

- Requests that arrive within `batch_wait` of each other, and any that queue while the backend
  is busy, go to the backend together (up to `max_batch`): that is what makes a batched local
  backend efficient behind an API that takes one prompt per request.
- The queue is bounded (`max_queue`): a full queue refuses at once (`QueueFull`, answered 429
  with Retry-After) instead of holding connections for minutes.
- A backend with `generate_rows` (see `RowBackend`; the hf backend has it) gets requests with
  different `max_tokens` in one batch, each row stopping at its own budget and handed back as
  soon as it finishes: a short request batched with a long one is answered before the long one
  ends. Requests still waiting when their client leaves are dropped before they run, and a row
  whose client leaves mid-generation stops generating.
- A single worker also means a backend that is not thread-safe (a transformers model) is only
  ever called from one thread.

What it does not do is continuous batching: a request that arrives while a batch is generating
waits for that batch to end (use vLLM or SGLang where that matters).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from vlm_judge.backends.base import Backend, Generation, GenerationParams, Prompt

CLIENT_ERROR = "client_error"
"""`Generation.extra` key a backend sets to True when a prompt failed by its own fault (an
undecodable image, a prompt over the context): the server answers it with 400, not 500."""
HISTORY = 100_000
"""How many batch sizes / reply statuses the stats keep (a long-running server must not grow)."""


@runtime_checkable
class RowBackend(Protocol):
    """Optional capability: per-prompt token budgets, early hand-out, cancellation."""

    def generate_rows(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        budgets: Sequence[int] | None = None,
        on_done: Callable[[int, Generation], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Generation]:
        ...


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


@dataclass
class ServerStats:
    """What the server saw, for tests and benchmarks."""

    requests: int = 0
    """Chat completion requests received."""
    in_flight: int = 0
    max_in_flight: int = 0
    """The most chat requests being handled at the same moment."""
    cancelled: int = 0
    """Requests dropped or stopped because their client disconnected."""
    batch_sizes: list[int] = field(default_factory=list)
    """Prompts per backend call (the latest HISTORY calls)."""
    statuses: list[int] = field(default_factory=list)
    """HTTP status of each chat reply, in the order they were sent (0: dropped, no reply)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, series: list[int], value: int) -> None:
        with self.lock:
            series.append(value)
            if len(series) > HISTORY:
                del series[: len(series) - HISTORY]


class Job:
    """One queued request; `future` resolves on the event loop that submitted it."""

    __slots__ = ("prompt", "params", "future", "loop", "cancelled", "started")

    def __init__(self, prompt: Prompt, params: GenerationParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt, self.params, self.loop = prompt, params, loop
        self.future: asyncio.Future[Generation] = loop.create_future()
        self.cancelled = False
        self.started = False

    def resolve(self, gen: Generation) -> None:
        def set_result() -> None:
            if not self.future.done():
                self.future.set_result(gen)

        try:
            self.loop.call_soon_threadsafe(set_result)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits any more
            pass


class MicroBatcher:
    """Gathers queued requests into backend calls on one worker thread (see the module doc)."""

    def __init__(self, backend: Backend, max_batch: int = 16, batch_wait: float = 0.005, max_queue: int = 256,
                 stats: ServerStats | None = None) -> None:
        if max_batch < 1 or batch_wait < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait >= 0")
        self.backend, self.max_batch, self.batch_wait = backend, max_batch, batch_wait
        self.stats = stats or ServerStats()
        self.rows = isinstance(backend, RowBackend)
        self._q: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="vlm-judge-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt, params: GenerationParams, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request; raises QueueFull when the queue is full."""
        job = Job(prompt, params, loop)
        if self._stopped:
            job.resolve(Generation(text=None, error="server stopped"))
            return job
        try:
            self._q.put_nowait(job)
        except queue.Full as e:
            raise QueueFull from e
        return job

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it has not started, else stop it at the next check."""
        if not job.cancelled:
            job.cancelled = True
            with self.stats.lock:
                self.stats.cancelled += 1

    def stop(self) -> None:
        self._stopped = True
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)
        while True:  # anyone still waiting gets an answer instead of hanging
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.resolve(Generation(text=None, error="server stopped"))

    def _gather(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch:
            try:
                job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._stopped = True
                break
            batch.append(job)
        return batch

    def _loop(self) -> None:
        while not self._stopped:
            first = self._q.get()
            if first is None:
                return
            batch = []
            for job in self._gather(first):
                if job.cancelled:  # its client left while it waited
                    job.resolve(Generation(text=None, error="cancelled"))
                else:
                    batch.append(job)
            # one backend call per distinct sampling setting (they are per call, not per prompt);
            # greedy decoding ignores the seed, so clients sending different seeds still batch;
            # a row backend also takes different max_tokens in one call
            groups: dict[GenerationParams, list[Job]] = {}
            for job in batch:
                key = job.params if job.params.temperature > 0 else replace(job.params, seed=None)
                if self.rows:
                    key = replace(key, max_new_tokens=0)
                groups.setdefault(key, []).append(job)
            for jobs in groups.values():
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        self.stats.record(self.stats.batch_sizes, len(jobs))
        for job in jobs:
            job.started = True
        prompts = [j.prompt for j in jobs]
        try:
            if self.rows:
                budgets = [j.params.max_new_tokens for j in jobs]
                params = replace(jobs[0].params, max_new_tokens=max(budgets))
                gens = self.backend.generate_rows(  # type: ignore[attr-defined]
                    prompts, params, budgets,
                    on_done=lambda i, g: jobs[i].resolve(g),
                    cancelled=lambda i: jobs[i].cancelled,
                )
            else:
                gens = self.backend.generate(prompts, jobs[0].params)
            if len(gens) != len(jobs):
                raise RuntimeError(f"backend returned {len(gens)} generations for {len(jobs)} prompts")
        except Exception as e:  # the backend broke its contract; answer every waiter anyway
            gens = [Generation(text=None, error=f"backend raised {type(e).__name__}: {e}")] * len(jobs)
        for job, g in zip(jobs, gens):
            job.resolve(g)  # a job handed out early keeps its first result
