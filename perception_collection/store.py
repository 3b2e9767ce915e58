"""Append-only JSONL files that survive a killed run, and the concurrent task loop the stages share.

Reading, appending, the torn-tail rule, atomic rewrites and the run-folder lock are the core's
(`vlm_judge.jsonl`); this module adds groups. A stage writes all records of one parent item (the
rubrics of one image, the five responses of one instruction) together, each line tagged with
`_of` = how many lines the item wrote. On resume an item counts as done only when all its lines
are there: a half-written item from a killed run is discarded (and the file is compacted), never
half-used.
"""

from __future__ import annotations

import contextlib
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


def run_stage(
    stage: str, path: Path, run_dir: Path, parents: Iterable[P], parent_id: Callable[[P], str], parent_key: str,
    from_dict: Callable[[dict[str, Any]], T], work: Callable[[P], tuple[list[T], list[Drop]]],
    concurrency: int, progress: bool,
) -> StageResult[T]:
    """The loop every generation stage shares: resume the parents already done from `path`, run
    `work` on the rest concurrently, append each parent's records as one group as it finishes
    (crash-safe), and record drops. A parent whose work raises gets one Drop and is retried on the
    next run; `parent_key` is the field of a record that names its parent."""
    parents = list(parents)
    wanted = {parent_id(p) for p in parents}
    done = {k: v for k, v in load_groups(path, parent_key).items() if k in wanted}
    records = [from_dict(strip_tags(r)) for rows in done.values() for r in rows]
    todo = [p for p in parents if parent_id(p) not in done]
    drop_file, drops = open_drops(run_dir, stage, done)
    n_done = 0
    with JsonlWriter(path) as out, drop_file:
        for parent, result, err in run_concurrently(todo, work, concurrency, stage, progress):
            if err is not None:
                new_drops = [Drop(parent_id(parent), stage, reason_of(err))]
            else:
                recs, new_drops = result
                out.write_group([r.to_dict() for r in recs])  # type: ignore[attr-defined]
                records += recs
                n_done += 1
            for d in new_drops:
                drop_file.write(d.to_dict())
            drops += new_drops
    return StageResult(records, drops, resumed=len(done), done=n_done)


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
