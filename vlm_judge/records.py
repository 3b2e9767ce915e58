"""The typed records that flow through vlm-judge: rubrics, judge requests and judgments.

Each is defined once here and validated on construction, so a bad row fails where it enters,
with a message that names the field, instead of deep inside a backend.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

Mode = Literal["absolute", "relative"]
Verdict = Union[int, Literal["A", "B", "tie"], None]
ParseStatus = Literal["ok", "parse_failure", "error"]

SCORES = (1, 2, 3, 4, 5)


class RecordError(ValueError):
    """A record is missing a field or holds a value outside its allowed range."""


@dataclass(frozen=True)
class ImageRef:
    """One image attached to a request: a local path or the encoded file bytes (never a URL)."""

    path: str | None = None
    """Local file path (already resolved against any image root)."""
    data: bytes | None = None
    """Encoded image bytes (PNG/JPEG/...), e.g. from a parquet Image column."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise RecordError("ImageRef needs exactly one of path or data")

    @property
    def key(self) -> str:
        """A stable identity used to group requests that share an image and to cache its pixels."""
        if self.path is not None:
            return "path:" + str(Path(self.path).resolve())
        return "sha1:" + hashlib.sha1(self.data or b"").hexdigest()

    def __repr__(self) -> str:  # keep logs short: never print image bytes
        return f"ImageRef(path={self.path!r})" if self.path else f"ImageRef({self.key[:13]})"


@dataclass(frozen=True)
class Rubric:
    """An evaluation criterion and what each score 1..5 means (the Prometheus rubric shape).

    Relative (A/B) grading needs only the criteria; absolute grading needs all five descriptions.
    """

    criteria: str
    """The question the judge answers about a response, e.g. 'Does the answer count the objects correctly?'."""
    score_descriptions: tuple[str, ...] = ()
    """Exactly five descriptions, for scores 1..5 in order, or empty (relative grading only)."""

    def __post_init__(self) -> None:
        if not isinstance(self.criteria, str) or not self.criteria.strip():
            raise RecordError("rubric.criteria must be a non-empty string")
        descs = tuple(self.score_descriptions or ())
        object.__setattr__(self, "score_descriptions", descs)
        if descs and (len(descs) != 5 or not all(isinstance(d, str) and d.strip() for d in descs)):
            raise RecordError(
                f"rubric needs five non-empty score descriptions (scores 1..5), got {len(descs)}"
            )

    @property
    def complete(self) -> bool:
        """True when the rubric has all five score descriptions (needed for absolute grading)."""
        return len(self.score_descriptions) == 5

    def to_text(self) -> str:
        """Render as the bracketed-criteria-then-'Score N:' text form the Prometheus family reads."""
        lines = [f"[{self.criteria.strip()}]"]
        lines += [f"Score {i}: {d.strip()}" for i, d in zip(SCORES, self.score_descriptions)]
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> Rubric:
        """Parse the text form written by `to_text` (criteria in brackets, then 'Score N: ...' lines)."""
        m = re.search(r"\[(.+?)\]\s*(?=Score\s*1\s*:|$)", text, re.S)
        criteria = (m.group(1) if m else text.split("Score 1:")[0]).strip()
        descs = []
        for i in SCORES:
            dm = re.search(rf"Score\s*{i}\s*:\s*(.*?)(?=\n?\s*Score\s*{i + 1}\s*:|$)", text, re.S)
            if dm:
                descs.append(dm.group(1).strip())
        if descs and len(descs) != 5:
            raise RecordError(f"rubric text has {len(descs)} of 5 'Score N:' lines")
        return cls(criteria=criteria, score_descriptions=tuple(descs))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rubric:
        """Build from a dict with `criteria` and `score1_description`..`score5_description` (or a list)."""
        if "score_descriptions" in d:
            return cls(d["criteria"], tuple(d["score_descriptions"]))
        descs = tuple(d[f"score{i}_description"] for i in SCORES if d.get(f"score{i}_description"))
        return cls(d["criteria"], descs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"criteria": self.criteria}
        out.update({f"score{i}_description": s for i, s in zip(SCORES, self.score_descriptions)})
        return out


@dataclass(frozen=True)
class JudgeRequest:
    """One thing to judge: a response (or two, for relative grading) to an instruction."""

    instruction: str
    """What the model under evaluation was asked."""
    response: str
    """The response to grade (response A in relative mode)."""
    rubric: Rubric
    """The criterion to grade against."""
    response_b: str | None = None
    """The second response; present exactly when mode is 'relative'."""
    reference_answer: str | None = None
    """An answer that would earn a 5 (absolute) or win (relative); optional."""
    images: tuple[ImageRef, ...] = ()
    """Zero or more images the instruction refers to."""
    id: str = ""
    """The caller's id for this row; echoed in the judgment."""
    mode: Mode = "absolute"
    """'absolute' (score 1..5) or 'relative' (A, B or tie)."""

    def __post_init__(self) -> None:
        for name in ("instruction", "response"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise RecordError(f"request {self.id!r}: field '{name}' is missing or empty")
        if not isinstance(self.rubric, Rubric):
            raise RecordError(f"request {self.id!r}: rubric must be a Rubric")
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "id", str(self.id))
        if self.mode == "relative":
            if not isinstance(self.response_b, str) or not self.response_b.strip():
                raise RecordError(f"request {self.id!r}: relative mode needs two responses (response_b)")
        elif self.mode == "absolute":
            if self.response_b is not None:
                raise RecordError(f"request {self.id!r}: absolute mode takes one response, got response_b")
            if not self.rubric.complete:
                raise RecordError(
                    f"request {self.id!r}: absolute grading needs a rubric with five score descriptions"
                )
        else:
            raise RecordError(f"request {self.id!r}: mode must be 'absolute' or 'relative', got {self.mode!r}")

    @property
    def image_key(self) -> str:
        """Identity of the image set, used to group requests that share images."""
        return "|".join(im.key for im in self.images)


@dataclass
class Judgment:
    """The judge's answer for one request. A parse failure is data here, never a default score."""

    id: str
    """The request's id."""
    mode: Mode
    """'absolute' or 'relative'."""
    score: Verdict
    """1..5 (absolute), 'A'/'B'/'tie' (relative), or None when no verdict could be read."""
    feedback: str = ""
    """The judge's feedback text (the output before the verdict)."""
    raw_output: str = ""
    """The last raw generation (for relative mode with swap: the first order's)."""
    status: ParseStatus = "ok"
    """'ok', 'parse_failure' (output had no readable verdict) or 'error' (the backend failed)."""
    reason: str = ""
    """Why the status is not 'ok'."""
    attempts: int = 1
    """How many generations it took (parse-failure retries included)."""
    samples: list[Verdict] = field(default_factory=list)
    """Per-sample verdicts when several samples were drawn (or both orders in relative mode)."""
    mean_score: float | None = None
    """Mean of the parsed sample scores (absolute mode with n > 1)."""
    judge: str = ""
    """The judge's name or path."""
    template: str = ""
    """The prompt template's name."""
    version: str = ""
    """vlm-judge's version."""

    def __post_init__(self) -> None:
        if self.mode == "absolute" and self.score is not None and self.score not in SCORES:
            raise RecordError(f"judgment {self.id!r}: absolute score must be 1..5, got {self.score!r}")
        if self.mode == "relative" and self.score not in ("A", "B", "tie", None):
            raise RecordError(f"judgment {self.id!r}: relative verdict must be A, B or tie, got {self.score!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
