"""Stage 1: image-specific rubrics, brainstormed by the teacher from seed rubrics shown in context.

Per image: sample `seeds.per_image` seed rubrics (reproducibly, from the run seed and the image
id), ask the teacher for `counts.rubrics_per_image` rubrics about this image, drop near-duplicate
criteria, and (if the teacher can) have each kept rubric reworded so the dataset's wording varies.
Dedup runs before rewording, so no call is spent rewording a duplicate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from perception_collection.config import BuildConfig
from perception_collection.rows import Drop, ImageRubric, SeedRubric, SourceImage, Teacher, TeacherError
from perception_collection.seeds import sample_seeds
from perception_collection.store import StageFile

STAGE = "rubrics"
FILE = "rubrics.jsonl"


def seeds_for(image: SourceImage, seeds: Sequence[SeedRubric], k: int, run_seed: int) -> list[SeedRubric]:
    """The seeds shown for this image: the same on every run, whatever the order images come in."""
    return sample_seeds(seeds, k, random.Random(f"{run_seed}:{image.image_id}"))


def rubrics_for_image(
    image: SourceImage, seeds: Sequence[SeedRubric], teacher: Teacher, cfg: BuildConfig,
) -> tuple[list[ImageRubric], list[Drop]]:
    """The rubric records of one image, and drops for the duplicates removed."""
    from perception_collection.filters import dedup_texts

    shown = seeds_for(image, seeds, cfg.seeds.per_image, cfg.seed)
    pairs = teacher.rubrics(image, shown, cfg.counts.rubrics_per_image)
    if not pairs:
        raise TeacherError("teacher wrote no rubric")
    keep = set(dedup_texts([r.criteria for r, _ in pairs], cfg.counts.rubric_dedup_threshold))
    drops = [Drop(image.image_id, STAGE, f"near-duplicate rubric dropped: {r.criteria[:80]!r}")
             for i, (r, _) in enumerate(pairs) if i not in keep]
    reword = getattr(teacher, "paraphrase_rubric", None) if cfg.counts.paraphrase_rubrics else None
    records = []
    for k, i in enumerate(sorted(keep)):
        rubric, seed = pairs[i]
        if reword is not None:
            try:
                rubric = reword(image, rubric)
            except TeacherError:  # the brainstormed wording is still a good rubric: keep it (the
                pass              # failed call shows in the teacher's error/parse-failure counts)
        records.append(ImageRubric(f"{image.image_id}/r{k}", image.image_id, rubric, seed))
    return records, drops


def open_file(run_dir: Path) -> StageFile[SourceImage, ImageRubric]:
    """`<run>/rubrics.jsonl`: the rubrics of each image, one group per image."""
    return StageFile(STAGE, Path(run_dir) / FILE, run_dir, "image_id", lambda im: im.image_id, ImageRubric.from_dict)
