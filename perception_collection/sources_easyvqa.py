"""easy-vqa as an image source: shape images with questions, gold answers and known image facts.

The `easy-vqa` package (MIT) ships 4000 train and 1000 test 64x64 images, each one coloured shape
(circle / rectangle / triangle in one of eight colours) on a pale background, with questions and
answers. For the answer-grounded teacher we need, per image, the facts a justification can state:

- **colour** and **shape**: read from the image's own questions and answers (a 'what colour is the
  circle?' question names both; yes/no questions give presence or absence);
- **size** (small / large): measured from the pixels (the fraction of the image the shape covers).
  Images whose shape is neither clearly small nor clearly large are skipped with that reason, so a
  size claim is never a coin flip for the judge.

Nothing is downloaded: the images are files inside the installed package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
SIZES = ("small", "large")

# Coverage (fraction of pixels the shape covers) below SMALL_MAX is 'small', above LARGE_MIN 'large';
# in between is ambiguous. Measured on the train split: coverage runs from ~0.01 to ~0.24, median ~0.075.
SMALL_MAX = 0.045
LARGE_MIN = 0.095
# Pale backgrounds have every channel above ~200; every shape colour has one channel well below.
_INK_THRESHOLD = 160

Split = Literal["train", "test"]


@dataclass(frozen=True)
class VQAQuestion:
    """One question about an image with its gold answer."""

    question: str
    answer: str
    asks: str
    """The fact the question asks about: 'color', 'shape', or 'presence' (a yes/no question)."""


@dataclass
class EasyVQAImage:
    """One easy-vqa image with the facts known about it."""

    id: str
    """'<split>-<image id>'."""
    path: str
    facts: dict[str, str]
    """{'color': ..., 'shape': ..., 'size': ...}."""
    questions: list[VQAQuestion] = field(default_factory=list)

    @property
    def caption(self) -> str:
        """A caption stating every fact (for caption-bridged text judges)."""
        return f"A {self.facts['size']} {self.facts['color']} {self.facts['shape']} on a plain light background."


@dataclass
class Skipped:
    """An image left out, and why."""

    id: str
    reason: str


def _word(q: str, vocab: tuple[str, ...]) -> str | None:
    for w in re.findall(r"[a-z]+", q):
        if w in vocab:
            return w
    return None


def names_a_fact(q: str) -> bool:
    """True when the question names a colour or a shape."""
    return _word(q, COLORS) is not None or _word(q, SHAPES) is not None


def classify_question(q: str, a: str) -> VQAQuestion:
    """Which fact a question asks about, from its wording and answer."""
    if a in ("yes", "no"):
        return VQAQuestion(q, a, "presence")
    if a in COLORS:
        return VQAQuestion(q, a, "color")
    if a in SHAPES:
        return VQAQuestion(q, a, "shape")
    raise ValueError(f"unexpected easy-vqa answer {a!r} for question {q!r}")


def facts_from_questions(qas: list[tuple[str, str]]) -> dict[str, str]:
    """Colour and shape of an image from its questions and answers (what can be inferred)."""
    facts: dict[str, str] = {}
    absent: dict[str, set[str]] = {"color": set(), "shape": set()}
    for q, a in qas:
        kind = classify_question(q, a).asks
        if kind in ("color", "shape"):
            facts[kind] = a
            # 'what color is the circle?' / 'what is the blue shape?' also name the other fact
            other, vocab = ("shape", SHAPES) if kind == "color" else ("color", COLORS)
            w = _word(q, vocab)
            if w:
                facts[other] = w
            continue
        negated = bool(re.search(r"\b(not|no)\b", q))
        present = (a == "yes") != negated
        for kind2, vocab in (("color", COLORS), ("shape", SHAPES)):
            w = _word(q, vocab)
            if w is None:
                continue
            if present:
                facts[kind2] = w
            else:
                absent[kind2].add(w)
    for kind2, vocab in (("color", COLORS), ("shape", SHAPES)):
        if kind2 not in facts:
            left = [v for v in vocab if v not in absent[kind2]]
            if len(left) == 1:
                facts[kind2] = left[0]
    return facts


def coverage(path: str | Path) -> float:
    """Fraction of the image the shape covers (pixels with a dark or saturated channel)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB"))
    return float((x.min(axis=-1) < _INK_THRESHOLD).mean())


def size_of(cov: float) -> str | None:
    """'small', 'large', or None when the coverage is in the ambiguous middle band."""
    if cov < SMALL_MAX:
        return "small"
    if cov > LARGE_MIN:
        return "large"
    return None


def load_easyvqa(
    split: Split = "train",
    limit: int | None = None,
    asks: tuple[str, ...] = ("color", "shape"),
    neutral_only: bool = True,
) -> tuple[list[EasyVQAImage], list[Skipped]]:
    """Images of one easy-vqa split with their facts and the questions asking about `asks`.

    neutral_only: keep only questions that name no colour or shape ('what color is the shape?', not
    'what color is the circle?'): a question that names a fact would tell a blind judge whether a
    response's justification is right.

    Returns (images, skipped); images come in id order, so the same call gives the same list.
    Needs the `easy-vqa` package (pip install 'vlm-judge[demo]').
    """
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the easy-vqa image source needs the easy-vqa package: pip install 'vlm-judge[demo]'") from e
    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(qs, ans, ids):
        by_image.setdefault(int(i), []).append((q, a))
    images: list[EasyVQAImage] = []
    skipped: list[Skipped] = []
    for i in sorted(by_image):
        if limit is not None and len(images) >= limit:
            break
        iid = f"{split}-{i}"
        path = paths.get(i) if isinstance(paths, dict) else paths[i]
        if not path or not Path(path).is_file():
            skipped.append(Skipped(iid, f"image file missing: {path}"))
            continue
        facts = facts_from_questions(by_image[i])
        missing = [k for k in ("color", "shape") if k not in facts]
        if missing:
            skipped.append(Skipped(iid, f"cannot infer {' and '.join(missing)} from the image's questions"))
            continue
        cov = coverage(path)
        size = size_of(cov)
        if size is None:
            skipped.append(Skipped(iid, f"ambiguous size (shape covers {cov:.3f} of the image)"))
            continue
        facts["size"] = size
        questions = [
            v for v in (classify_question(q, a) for q, a in by_image[i])
            if v.asks in asks and not (neutral_only and names_a_fact(v.question))
        ]
        if not questions:
            skipped.append(Skipped(iid, f"no question asking about {asks}"))
            continue
        images.append(EasyVQAImage(iid, str(path), facts, questions))
    return images, skipped
