"""Stage 2: instructions with reference answers, `counts.instructions_per_rubric` per rubric.

An instruction is a request a user would make about the image that the rubric grades; its
reference answer is what earns a 5. Exact repeats within one rubric are dropped (with a reason).
"""

from __future__ import annotations

from pathlib import Path

from perception_collection.config import BuildConfig
from perception_collection.rows import Drop, ImageRubric, Instruction, SourceImage, Teacher, TeacherError
from perception_collection.store import StageFile

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


def open_file(run_dir: Path) -> StageFile[ImageRubric, Instruction]:
    """`<run>/instructions.jsonl`: the instructions of each rubric, one group per rubric."""
    return StageFile(STAGE, Path(run_dir) / FILE, run_dir, "rubric_id", lambda r: r.rubric_id, Instruction.from_dict)
