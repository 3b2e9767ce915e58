"""The records that flow between the data builder's stages, and the teacher interface.

Every stage reads the records of the stage before from a JSONL file in the run folder and appends
its own, so a crashed run resumes where it stopped. Each record has a stable id derived from its
parents (``<image_id>/r<k>/i<k>/s<score>``), which is what makes resuming free of duplicates.

    SourceImage --rubrics--> ImageRubric --instructions--> Instruction --responses--> GradedResponse
                                                     joined: Example (one graded response, everything it needs)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from vlm_judge.records import Rubric

SCORES = (1, 2, 3, 4, 5)

_P = TypeVar("_P", bound="_Plain")


class _Plain:
    """Plain-mapping round trip of a flat record (a JSONL line of a stage file)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_P], d: dict[str, Any]) -> _P:
        return cls(**d)


@dataclass
class SourceImage(_Plain):
    """One validated image and what is known about it."""

    image_id: str
    """Unique within a run, e.g. 'coco-000000397133', 'mmmu-validation_Art_1', 'folder-cat.jpg'."""
    path: str
    """Local path of the image file (MMMU images are written out from the parquet bytes)."""
    source: str
    """'coco', 'mmmu', 'folder', 'easyvqa', ..."""
    context: str = ""
    """Text the teacher sees beside the image: COCO captions and object labels, the MMMU question,
    options and answer, a folder's metadata. Also the caption used by the text-only export."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source-specific facts (MMMU subject, COCO labels, easy-vqa facts/questions, width/height)."""


@dataclass(frozen=True)
class SeedRubric:
    """A hand-written, fine-grained rubric shipped with the package (seed_rubrics.yaml)."""

    name: str
    """Short unique key, e.g. 'object_counting'."""
    category: str
    """Group, e.g. 'grounding', 'ocr', 'reasoning', 'safety'."""
    rubric: Rubric


@dataclass
class ImageRubric:
    """An image-specific rubric written by the teacher from seed rubrics shown in context."""

    rubric_id: str
    """'<image_id>/r<k>'."""
    image_id: str
    rubric: Rubric
    seed: str = ""
    """Name of the seed rubric it was derived from ('' when unknown)."""

    def to_dict(self) -> dict[str, Any]:
        return {"rubric_id": self.rubric_id, "image_id": self.image_id, "seed": self.seed,
                "rubric": self.rubric.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRubric:
        return cls(d["rubric_id"], d["image_id"], Rubric.from_dict(d["rubric"]), d.get("seed", ""))


@dataclass
class Instruction(_Plain):
    """A question a user would ask about the image under one rubric, with an answer that earns a 5."""

    instruction_id: str
    """'<rubric_id>/i<k>'."""
    rubric_id: str
    image_id: str
    instruction: str
    reference_answer: str


@dataclass
class GradedResponse(_Plain):
    """One of the five responses to an instruction, written to earn `score`, with its feedback."""

    response_id: str
    """'<instruction_id>/s<score>'."""
    instruction_id: str
    score: int
    response: str
    feedback: str
    """Feedback that explains the score against the rubric (without the verdict sentence)."""


@dataclass
class Example:
    """One graded response joined with its instruction, rubric and image: what filters and exporters see."""

    image: SourceImage
    rubric: ImageRubric
    instruction: Instruction
    response: GradedResponse

    @property
    def id(self) -> str:
        return self.response.response_id

    @property
    def group_id(self) -> str:
        """The instruction the five graded responses share."""
        return self.instruction.instruction_id


@dataclass
class Drop(_Plain):
    """A record left out by a source, a stage or a filter, and why (reported in the run summary)."""

    id: str
    stage: str
    """'source', 'rubrics', 'instructions', 'responses', or a filter's name."""
    reason: str


class TeacherError(RuntimeError):
    """The teacher could not produce usable output for one item (bad format, server error after retries).

    Stages catch it, record a Drop with its message and go on with the other items.
    """


@runtime_checkable
class Teacher(Protocol):
    """Writes the text of every stage. One item per call; the pipeline runs calls concurrently.

    Implementations: an LLM teacher over any `vlm_judge` backend (OpenAI-compatible server or
    local transformers model), and the answer-grounded teacher for VQA data with gold answers.
    Methods raise TeacherError for an item they cannot do.
    """

    name: str

    def rubrics(self, image: SourceImage, seeds: Sequence[SeedRubric], n: int) -> list[tuple[Rubric, str]]:
        """Up to n image-specific rubrics, each with the name of the seed it came from."""
        ...

    def instructions(self, image: SourceImage, rubric: Rubric, n: int) -> list[tuple[str, str]]:
        """Up to n (instruction, reference answer) pairs for this image under this rubric."""
        ...

    def responses(
        self, image: SourceImage, rubric: Rubric, instruction: str, reference_answer: str,
        scores: Sequence[int] = SCORES,
    ) -> dict[int, tuple[str, str]]:
        """For each requested score, (response, feedback): a response that earns exactly that score
        and feedback explaining the score against the rubric."""
        ...

    def noisy_instruction(self, image: SourceImage, instruction: str) -> str:
        """A close but different instruction about the same image (Self-Taught Evaluator)."""
        ...

    def answer(self, image: SourceImage, instruction: str) -> str:
        """A good answer to an instruction (used for both sides of a noisy-instruction pair)."""
        ...
