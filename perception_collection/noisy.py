"""The noisy-instruction stage (Self-Taught Evaluator style): preference pairs without grading.

For each instruction the teacher writes a close but different instruction about the same image
(`Teacher.noisy_instruction`) and answers both (`Teacher.answer`). The answer to the noisy
instruction is a fluent, on-topic answer to the wrong question, so it loses against the answer to
the real one: a pair whose winner is known by construction, that teaches a judge to check that a
response answers *what was asked*. Rows use the pairwise schema of `export.pair_row`, so the
trainer reads them like the graded pairs (pass them to `export_all(extra_pairs=...)` to put them,
with their images, into the exported pairwise file).

The stage is resumable: rows are appended to `out_path` as they complete; a re-run skips ids already
there and repairs a torn last line (a crash mid-write). A TeacherError (or an unusable result) for
one item becomes a Drop, and the other items go on. Failed items are not recorded in the file, so a
re-run tries them again.
"""

from __future__ import annotations

import logging
import random
import re
from contextlib import closing
from pathlib import Path
from typing import Any

from perception_collection.export import pair_row
from perception_collection.rows import Drop, Instruction, SourceImage, Teacher, TeacherError
from perception_collection.store import run_concurrently
from vlm_judge.jsonl import BadLine, JsonlAppender, cut_torn_tail, iter_jsonl
from vlm_judge.records import Rubric

log = logging.getLogger("perception_collection.noisy")

STAGE = "noisy"

NOISY_RUBRIC = Rubric(
    "Does the response answer the instruction exactly as it was asked about this image, rather than a "
    "related but different question?"
)
"""Relative-grading criterion of noisy pairs (criteria only: relative prompts show no score levels)."""


def pair_id(ins: Instruction) -> str:
    """The row id of an instruction's noisy pair."""
    return f"{ins.instruction_id}/noisy"


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def read_done(out_path: Path) -> dict[str, dict[str, Any]]:
    """Rows already in out_path by id. The torn-tail rule of `vlm_judge.jsonl` applies to the last
    line (cut when torn, given its newline when complete); a bad line elsewhere is an error naming it."""
    if not out_path.exists():
        return {}
    if cut_torn_tail(out_path):
        log.warning("%s: dropped a torn last line from an interrupted run", out_path)
    done: dict[str, dict[str, Any]] = {}
    for n, row in iter_jsonl(out_path):
        if isinstance(row, BadLine):
            raise ValueError(f"{out_path}: line {n} is not valid JSON ({row.reason}); fix or remove it")
        if not row.get("id"):
            raise ValueError(f"{out_path}: line {n} is not a row object with an 'id'")
        done[str(row["id"])] = row
    return done


def noisy_row(image: SourceImage, ins: Instruction, noisy: str, good: str, bad: str, seed: int = 0,
              template: str = "default") -> dict[str, Any]:
    """The pairwise row: the answer to the real instruction wins against the answer to the noisy one.
    The winner's position is drawn from `seed` and the id, so it does not depend on run order."""
    pid = pair_id(ins)
    chosen_first = random.Random(f"{seed}:{pid}").random() < 0.5
    return pair_row(
        pid, image.path, ins.instruction, NOISY_RUBRIC, good, bad,
        "It answers the instruction that was asked.",
        f"It answers a different question (\"{noisy.strip()}\") instead of the one asked, so it does not give "
        "the user what they wanted.",
        chosen_first, reference_answer=None, template=template,
        extra={"image_id": image.image_id, "noisy_instruction": noisy.strip(), "pair_source": "noisy_instruction"},
    )


def _one(teacher: Teacher, image: SourceImage, ins: Instruction, seed: int, template: str) -> dict[str, Any]:
    noisy = teacher.noisy_instruction(image, ins.instruction)
    if not isinstance(noisy, str) or not noisy.strip():
        raise TeacherError("the teacher wrote an empty noisy instruction")
    if _norm(noisy) == _norm(ins.instruction):
        raise TeacherError("the noisy instruction is the original instruction again")
    good = teacher.answer(image, ins.instruction)
    bad = teacher.answer(image, noisy)
    for name, text in (("the instruction", good), ("the noisy instruction", bad)):
        if not isinstance(text, str) or not text.strip():
            raise TeacherError(f"the teacher's answer to {name} is empty")
    if _norm(good) == _norm(bad):
        raise TeacherError("both answers are the same text: the pair carries no preference")
    return noisy_row(image, ins, noisy, good, bad, seed, template)


def noisy_pairs(
    items: list[tuple[SourceImage, Instruction]], teacher: Teacher, out_path: Path, concurrency: int = 4,
    *, seed: int = 0, template: str = "default",
) -> tuple[list[dict[str, Any]], list[Drop]]:
    """Noisy-instruction pairs for `items`, appended to `out_path` (JSONL) as they complete.

    Returns (rows for these items, old and new, in item order; drops of this run). At most
    `concurrency` teacher calls run at once, and at most 2x that many items are in flight.
    Exceptions other than TeacherError (bugs) propagate after the finished rows are written.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    todo: list[tuple[SourceImage, Instruction]] = []
    queued: set[str] = set()
    for image, ins in items:
        pid = pair_id(ins)
        if pid not in done and pid not in queued:
            queued.add(pid)
            todo.append((image, ins))
    if done:
        log.info("noisy: %d of %d items already done in %s", len(items) - len(todo), len(items), out_path)
    drops: list[Drop] = []
    # closing(): on a bug, the work not yet started is cancelled before the error propagates
    with JsonlAppender(out_path) as f, closing(run_concurrently(
            todo, lambda item: _one(teacher, item[0], item[1], seed, template), concurrency, STAGE,
            progress=False)) as work:
        for (_, ins), row, err in work:
            if isinstance(err, TeacherError):
                drops.append(Drop(pair_id(ins), STAGE, str(err)))
                continue
            if err is not None:
                raise err  # a bug: the rows finished so far are already written
            f.write(row)  # one complete line per finished item, flushed: a crash loses at most that line
            done[pair_id(ins)] = row
    rows = [done[pair_id(ins)] for _, ins in items if pair_id(ins) in done]
    # an item listed twice yields its row once
    seen: set[str] = set()
    rows = [r for r in rows if not (r["id"] in seen or seen.add(r["id"]))]
    return rows, drops
