"""Stage 3: five graded responses per instruction, one for each score 1..5, each with feedback.

The five are asked for together, so the teacher writes them as a graded set. A judge trained on
sets whose length grows with the score learns to reward length, so each set must be length-matched:
when max/min word count exceeds `length_ratio`, the set is asked for again (up to
`max_regenerations` times, telling a teacher that accepts `length_hint` the target length), and
dropped with the measured ratio if it never fits.
"""

from __future__ import annotations

import inspect
import statistics
from pathlib import Path

from perception_collection.config import BuildConfig
from perception_collection.rows import (
    SCORES,
    GradedResponse,
    ImageRubric,
    Instruction,
    SourceImage,
    Teacher,
    TeacherError,
)
from perception_collection.store import StageFile

STAGE = "responses"
FILE = "responses.jsonl"


def _takes_length_hint(teacher: Teacher) -> bool:
    """Whether the teacher's `responses` accepts `length_hint` and `draw` (LLMTeacher does; the
    Teacher protocol does not require it)."""
    try:
        params = inspect.signature(teacher.responses).parameters
    except (TypeError, ValueError):
        return False
    return "length_hint" in params and "draw" in params


def responses_for_instruction(
    image: SourceImage, rubric: ImageRubric, ins: Instruction, teacher: Teacher, cfg: BuildConfig,
) -> list[GradedResponse]:
    """The five graded responses of one instruction, length-matched, or TeacherError saying why not."""
    from perception_collection.filters import length_ratio

    hint_ok = _takes_length_hint(teacher)
    tries = 1 + (cfg.max_regenerations if hint_ok else 0)  # without a hint a retry would repeat itself
    hint: int | None = None
    ratio = 0.0
    for k in range(tries):
        kwargs = {"length_hint": hint, "draw": k} if hint_ok and k else {}
        out = teacher.responses(image, rubric.rubric, ins.instruction, ins.reference_answer, SCORES, **kwargs)
        missing = [s for s in SCORES if s not in out]
        if missing:
            raise TeacherError(f"no response for score(s) {missing}")
        texts = [out[s][0] for s in SCORES]
        ratio = length_ratio(texts)
        if ratio <= cfg.length_ratio:
            return [GradedResponse(f"{ins.instruction_id}/s{s}", ins.instruction_id, s, out[s][0], out[s][1])
                    for s in SCORES]
        hint = max(1, round(statistics.median(len(t.split()) for t in texts)))
    raise TeacherError(f"length ratio {ratio:.2f} over {cfg.length_ratio:g} after {tries} "
                       f"{'try' if tries == 1 else 'tries'} (max/min words of the five responses)")


def open_file(run_dir: Path) -> StageFile[Instruction, GradedResponse]:
    """`<run>/responses.jsonl`: the five responses of each instruction, one group per instruction
    (a responses drop always means the item is not done: the five come as one group or not at all)."""
    return StageFile(STAGE, Path(run_dir) / FILE, run_dir, "instruction_id", lambda i: i.instruction_id,
                     GradedResponse.from_dict)
