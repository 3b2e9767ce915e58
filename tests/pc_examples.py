"""Builders of joined Perception-Collection examples for the filter/export/noisy tests.

The texts read like a teacher's graded ladder about a real photo: five responses of similar
length, each a different claim, with feedback that explains the score without stating it.
"""

from __future__ import annotations

from pathlib import Path

from perception_collection.rows import Example, GradedResponse, ImageRubric, Instruction, SourceImage
from vlm_judge.records import Rubric

RUBRIC = Rubric(
    "Does the response describe the main subject of the photo and its colours correctly?",
    (
        "The subject and colours are both wrong.",
        "The subject is wrong, one colour is right.",
        "The subject is right, the colours are wrong.",
        "The subject is right, one colour is wrong.",
        "The subject and every colour are right.",
    ),
)

LADDER = {
    1: ("A green parrot sits on a wooden fence beside a river in the morning.",
        "The photo shows no parrot, fence or river, and the colours named do not appear anywhere in it."),
    2: ("A brown dog rests on an orange blanket next to a glass window.",
        "There is no dog in the photo; only the orange it names matches something the photo shows."),
    3: ("A cat lies on a blue sofa under a purple lamp in a dark room.",
        "The animal is a cat as stated, but the sofa and the lamp colours do not match the photo."),
    4: ("A tabby cat lies on a red cushion with gray stripes on its fur.",
        "The cat and its striped fur are right, but the cushion in the photo is not red."),
    5: ("A gray tabby cat with dark stripes lies on an orange and white cloth.",
        "Subject, fur pattern and the colours of the cloth all match what the photo shows."),
}


def make_image(path: Path | str, image_id: str = "img", context: str = "A tabby cat lying on a cloth.") -> SourceImage:
    return SourceImage(image_id=image_id, path=str(path), source="folder", context=context,
                       meta={"width": 64, "height": 64})


def make_group(
    image: SourceImage,
    k: int = 0,
    instruction: str = "Describe the animal in this photo and the colours around it.",
    ladder: dict[int, tuple[str, str]] | None = None,
    rubric: Rubric = RUBRIC,
    reference: str = "A gray tabby cat with dark stripes lies on an orange and white cloth.",
) -> list[Example]:
    """Five examples (scores 1..5) answering one instruction about `image`."""
    rid = f"{image.image_id}/r0"
    ir = ImageRubric(rid, image.image_id, rubric, seed="color_accuracy")
    iid = f"{rid}/i{k}"
    ins = Instruction(iid, rid, image.image_id, instruction, reference)
    out = []
    for score, (resp, fb) in sorted((ladder or LADDER).items()):
        out.append(Example(image, ir, ins, GradedResponse(f"{iid}/s{score}", iid, score, resp, fb)))
    return out
