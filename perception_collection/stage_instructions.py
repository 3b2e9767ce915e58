"""Stage 2: instructions with reference answers, `counts.instructions_per_rubric` per rubric.

An instruction is a request a user would make about the image that the rubric grades; its
reference answer is what earns a 5. Exact repeats within one rubric are dropped (with a reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from perception_collection.config import BuildConfig
from perception_collection.rows import Drop, ImageRubric, Instruction, SourceImage, Teacher, TeacherError
from perception_collection.store import (
    JsonlWriter,
    StageResult,
    load_groups,
    open_drops,
    reason_of,
    run_concurrently,
    strip_tags,
)

STAGE = "instructions"
FILE = "instructions.jsonl"


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def instructions_for_rubric(
    image: SourceImage, rubric: ImageRubric, teacher: Teacher, cfg: BuildConfig,
) -> tuple[list[Instruction], list[Drop]]:
    """The instruction records of one rubric, and drops for repeated ones."""
    pairs = teacher.instructions(image, rubric.rubric, cfg.counts.instructions_per_rubric)
    records: list[Instruction] = []
    drops: list[Drop] = []
    seen: set[str] = set()
    for text, ref in pairs:
        if _norm(text) in seen:
            drops.append(Drop(rubric.rubric_id, STAGE, f"repeated instruction dropped: {text[:80]!r}"))
            continue
        seen.add(_norm(text))
        records.append(Instruction(f"{rubric.rubric_id}/i{len(records)}", rubric.rubric_id, image.image_id, text, ref))
    if not records:
        raise TeacherError("teacher wrote no instruction")
    return records, drops


def run(
    images: Mapping[str, SourceImage], rubrics: Sequence[ImageRubric], teacher: Teacher, run_dir: Path,
    cfg: BuildConfig, progress: bool = True,
) -> StageResult[Instruction]:
    """Instructions for every rubric not done yet; appends to `<run>/instructions.jsonl`."""
    path = Path(run_dir) / FILE
    wanted = {r.rubric_id for r in rubrics if r.image_id in images}
    done = {k: v for k, v in load_groups(path, "rubric_id").items() if k in wanted}
    records = [Instruction.from_dict(strip_tags(r)) for rows in done.values() for r in rows]
    todo = [r for r in rubrics if r.rubric_id in wanted and r.rubric_id not in done]
    drop_file, drops = open_drops(run_dir, STAGE, done)
    n_done = 0
    with JsonlWriter(path) as out, drop_file:
        work = run_concurrently(todo, lambda r: instructions_for_rubric(images[r.image_id], r, teacher, cfg),
                                cfg.teacher.concurrency, STAGE, progress)
        for rubric, result, err in work:
            if err is not None:
                new_drops = [Drop(rubric.rubric_id, STAGE, reason_of(err))]
            else:
                recs, new_drops = result
                out.write_group([r.to_dict() for r in recs])
                records += recs
                n_done += 1
            for d in new_drops:
                drop_file.write(d.to_dict())
            drops += new_drops
    return StageResult(records, drops, resumed=len(done), done=n_done)
