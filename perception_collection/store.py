"""Append-only JSONL files that survive a killed run, and the one pool of work items the stages share.

Reading, appending, the torn-tail rule, atomic rewrites and the run-folder lock are the core's
(`vlm_judge.jsonl`); this module adds groups. A stage writes all records of one parent item (the
rubrics of one image, the five responses of one instruction) together, each line tagged with
`_of` = how many lines the item wrote. On resume an item counts as done only when all its lines
are there: a half-written item from a killed run is discarded (and the file is compacted), never
half-used.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from perception_collection.rows import Drop, TeacherError
from vlm_judge.jsonl import JsonlAppender, Locked, exclusive_lock, has_torn_tail, read_jsonl, write_jsonl_atomic

T = TypeVar("T")
R = TypeVar("R")

GROUP_KEY = "_of"
"""Line field: number of lines its item wrote (used to detect half-written items)."""


class JsonlWriter(JsonlAppender):
    """The core appender (`vlm_judge.jsonl`) plus groups: one `write_group` call writes one item's
    lines together, tagged so a half-written item is detectable."""

    def write(self, obj: dict[str, Any]) -> None:  # type: ignore[override]
        """Append one line (untagged: a record that is an item of its own)."""
        super().write([obj])

    def write_group(self, objs: list[dict[str, Any]], tag: bool = True) -> None:
        """Write the lines of one item in one go (tagged with `_of` so a partial item is detectable)."""
        n = len(objs)
        super().write([{**o, GROUP_KEY: n} if tag else o for o in objs])


def load_groups(path: str | Path, parent_key: str) -> dict[str, list[dict[str, Any]]]:
    """Complete items of a stage file, by parent id; half-written items are dropped and the file
    is rewritten without them (and without duplicate items from an earlier bug or a manual merge)."""
    rows = read_jsonl(path)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(parent_key)), []).append(r)
    complete: dict[str, list[dict[str, Any]]] = {}
    changed = False
    for parent, items in groups.items():
        n = items[0].get(GROUP_KEY, len(items))
        if len(items) == n:
            complete[parent] = items
        elif len(items) > n and n > 0:  # the same item written twice: keep the first copy
            complete[parent] = items[:n]
            changed = True
        else:
            changed = True
    if changed or has_torn_tail(path):
        write_jsonl_atomic(path, (r for items in complete.values() for r in items))
    return complete


def strip_tags(row: dict[str, Any]) -> dict[str, Any]:
    """A stored line without the store's own fields (ready for a record's from_dict)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def run_concurrently(
    items: Iterable[T],
    fn: Callable[[T], R],
    concurrency: int,
    desc: str,
    progress: bool = True,
    total: int | None = None,
) -> Iterator[tuple[T, R | None, BaseException | None]]:
    """Run fn over items with at most `concurrency` in flight; yield (item, result, error) as each
    finishes, so the caller can save it at once. An `Exception` is yielded as the error; anything
    else (KeyboardInterrupt, SystemExit) stops the loop, cancels what has not started, and propagates.
    """
    from tqdm.auto import tqdm

    items = list(items)
    bar = tqdm(total=total if total is not None else len(items), desc=desc, disable=not progress, unit="item",
               dynamic_ncols=True, leave=True)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix=f"pc-{desc}")
    pending: dict[Future, T] = {}
    it = iter(items)
    try:
        # submit lazily: a kill loses at most `concurrency` items in flight, and memory stays flat
        for item in it:
            pending[pool.submit(fn, item)] = item
            if len(pending) >= concurrency * 2:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                err = fut.exception()
                if err is not None and not isinstance(err, Exception):
                    raise err
                bar.update(1)
                yield item, (None if err else fut.result()), err
            for item in it:
                pending[pool.submit(fn, item)] = item
                if len(pending) >= concurrency * 2:
                    break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


@dataclass
class StageResult(Generic[T]):
    """What one stage ended with: all its records (resumed + new), and its drops of this run."""

    records: list[T]
    drops: list[Drop]
    resumed: int = 0
    """Parent items found complete from an earlier run (no teacher call made for them)."""
    done: int = 0
    """Parent items completed in this run."""


def open_drops(run_dir: Path, stage: str, done: set[str] | dict | None = None) -> tuple[JsonlWriter, list[Drop]]:
    """The stage's drop file, and the drops kept from earlier runs.

    A drop's id is the parent item it belongs to. Drops of items found done (e.g. a near-duplicate
    rubric dropped from an image whose rubrics were saved) are kept, so a resumed run's summary
    still reports them; drops of unfinished items are discarded, because those items are retried
    (from the cache when the failure was in the teacher's text, so a repeat costs nothing).
    """
    path = Path(run_dir) / "drops" / f"{stage}.jsonl"
    keep = set(done or ())
    old = [Drop(str(r["id"]), str(r["stage"]), str(r["reason"])) for r in read_jsonl(path)
           if {"id", "stage", "reason"} <= set(r) and r["id"] in keep]
    writer = JsonlWriter(path, truncate=True)
    for d in old:
        writer.write(d.to_dict())
    return writer, old


P = TypeVar("P")


class StageFile(Generic[P, T]):
    """One generation stage's files: `path` holds each parent item's records as one group (appended
    as the item finishes, so a kill keeps every finished item), `drops/<stage>.jsonl` its drops.

    On open, complete groups from an earlier run are loaded (half-written ones discarded); a parent
    found there is `resume`d without any work. Only parents visited in this run count in `result()`
    (an image taken out of the recipe leaves its old records on disk but out of the build)."""

    def __init__(self, stage: str, path: Path, run_dir: Path, parent_key: str, parent_id: Callable[[P], str],
                 from_dict: Callable[[dict[str, Any]], T]) -> None:
        self.stage, self.parent_id, self.from_dict = stage, parent_id, from_dict
        self._groups = load_groups(path, parent_key)
        self._drop_file, old = open_drops(run_dir, stage, self._groups)
        self._old_drops: dict[str, list[Drop]] = {}
        for d in old:
            self._old_drops.setdefault(d.id, []).append(d)
        self._out = JsonlWriter(path)
        self.records: list[T] = []
        self.drops: list[Drop] = []
        self.resumed = self.done = 0

    def resume(self, parent: P) -> list[T] | None:
        """The records of a parent done in an earlier run (and its drops, still reported), or None."""
        pid = self.parent_id(parent)
        rows = self._groups.get(pid)
        if rows is None:
            return None
        recs = [self.from_dict(strip_tags(r)) for r in rows]
        self.records += recs
        self.drops += self._old_drops.get(pid, [])
        self.resumed += 1
        return recs

    def save(self, parent: P, records: list[T], drops: list[Drop]) -> None:
        """Append one finished parent's records as one group, and its drops."""
        self._out.write_group([r.to_dict() for r in records])  # type: ignore[attr-defined]
        self.records += records
        self.done += 1
        self._drop(drops)

    def fail(self, parent: P, err: BaseException) -> None:
        """A parent whose work raised: one Drop; the item is retried on the next run."""
        self._drop([Drop(self.parent_id(parent), self.stage, reason_of(err))])

    def _drop(self, drops: list[Drop]) -> None:
        for d in drops:
            self._drop_file.write(d.to_dict())
        self.drops += drops

    def result(self) -> StageResult[T]:
        """Records and drops of the parents visited in this run."""
        return StageResult(self.records, self.drops, resumed=self.resumed, done=self.done)

    def close(self) -> None:
        """Close the stage's files."""
        self._out.close()
        self._drop_file.close()


class Flow:
    """One bounded pool of work items shared by every stage of a build.

    `add(depth, fn, then)` queues `fn()`; when it returns (or raises an `Exception`), `then(result,
    error)` runs in the thread that called `run()` (so files are written from one thread) and may
    `add` the item's children. At most `concurrency` items run at once, across all stages, so a
    stage's item starts as soon as its parent is back: no stage waits for the slowest item of the
    one before. Ready items of the deepest stage go first (FIFO within a stage): finished items
    reach the disk early, and new parents (images) are opened only when there is no deeper work, so
    the number of images in flight, and the memory they hold, stays small. A few ready items wait
    inside the pool so a worker never waits for this thread between calls. Anything that is not an
    `Exception` (KeyboardInterrupt, SystemExit) stops the run, cancels what has not started, and
    propagates.
    """

    def __init__(self, concurrency: int, progress: bool = True) -> None:
        self.concurrency = max(1, int(concurrency))
        self.progress = progress
        self._ready: list[tuple[int, int, Callable[[], Any], Callable[[Any, BaseException | None], None], str]] = []
        self._seq = itertools.count()
        self._bars: dict[str, Any] = {}

    def add(self, depth: int, fn: Callable[[], R], then: Callable[[R | None, BaseException | None], None],
            desc: str) -> None:
        """Queue one item of stage `desc` at `depth` (0 = first stage); `then` gets (result, error)."""
        heapq.heappush(self._ready, (-depth, next(self._seq), fn, then, desc))
        self._bar(desc).total += 1

    def _bar(self, desc: str) -> Any:
        if desc not in self._bars:
            from tqdm.auto import tqdm

            self._bars[desc] = tqdm(total=0, desc=desc, disable=not self.progress, unit="item", dynamic_ncols=True,
                                    leave=True, position=len(self._bars))
        return self._bars[desc]

    def run(self) -> None:
        """Run until no item is queued or running."""
        limit = 2 * self.concurrency  # running + waiting inside the pool
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="pc-flow")
        pending: dict[Future, tuple[Callable[[Any, BaseException | None], None], str]] = {}
        try:
            while self._ready or pending:
                while self._ready and len(pending) < limit:
                    _, _, fn, then, desc = heapq.heappop(self._ready)
                    pending[pool.submit(fn)] = (then, desc)
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in [f for f in pending if f in done]:  # in the order they were started
                    then, desc = pending.pop(fut)
                    err = fut.exception()
                    if err is not None and not isinstance(err, Exception):
                        raise err
                    bar = self._bars[desc]
                    bar.update(1)
                    then(None if err else fut.result(), err)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for bar in self._bars.values():
                bar.close()


def reason_of(err: BaseException) -> str:
    """A Drop reason: a TeacherError's own message; anything else is a bug worth naming."""
    return str(err) if isinstance(err, TeacherError) else f"unexpected {type(err).__name__}: {err}"


class RunLocked(Locked):
    """Another process is building into the same run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the core's exclusive lock (`vlm_judge.jsonl.exclusive_lock`) on the run folder: two
    builds appending to the same files would interleave their items. A killed run leaves no
    stale lock."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(Path(run_dir), "build"))
        except Locked as e:
            raise RunLocked(f"another build is running in {run_dir} ({e})") from e
        yield
