"""easy-vqa as an image source: shape images with questions, gold answers and known image facts.

The `easy-vqa` package (MIT) ships 4000 train and 1000 test 64x64 images, each one coloured shape
(circle / rectangle / triangle in one of eight colours) on a pale background, with questions and
answers. For the answer-grounded teacher we need, per image, the facts a justification can state:

- **colour** and **shape**: read from the image's own questions and answers (a 'what colour is the
  circle?' question names both; yes/no questions give presence or absence);
- **size** (small / large): measured from the pixels (the fraction of the image the shape covers).
  Images whose shape is neither clearly small nor clearly large are skipped with that reason, so a
  size claim is never a coin flip for the judge.

Nothing is downloaded: the images are files inside the installed package (or a folder with the
same layout). `load_source` hands them to the data builder as `rows.SourceImage`s.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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


def data_root(root: str | Path | None = None) -> Path:
    """The folder holding easy-vqa's splits (`<root>/<split>/questions.json`, `<root>/<split>/images/`):
    `root` when given, else the data folder inside the installed `easy-vqa` package."""
    if root is not None:
        return Path(root)
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the easy-vqa image source needs the easy-vqa package: pip install 'vlm-judge[demo]' "
                          "(or pass root= a folder with the easy-vqa data layout)") from e
    return Path(easy_vqa.__file__).resolve().parent / "data"


def _read_split(split: str, root: Path) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """(question, answer, image id) triples and image paths of one split, read from the data files."""
    import json

    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    qfile = root / split / "questions.json"
    if not qfile.is_file():
        raise FileNotFoundError(f"easy-vqa questions not found: {qfile}")
    triples = [(str(q), str(a), int(i)) for q, a, i in json.loads(qfile.read_text(encoding="utf-8"))]
    images = root / split / "images"
    paths = {int(p.stem): str(p) for p in images.glob("*.png") if p.stem.isdigit()} if images.is_dir() else {}
    return triples, paths


def load_easyvqa(
    split: Split = "train",
    limit: int | None = None,
    asks: tuple[str, ...] = ("color", "shape"),
    neutral_only: bool = True,
    root: str | Path | None = None,
) -> tuple[list[EasyVQAImage], list[Skipped]]:
    """Images of one easy-vqa split with their facts and the questions asking about `asks`.

    neutral_only: keep only questions that name no colour or shape ('what color is the shape?', not
    'what color is the circle?'): a question that names a fact would tell a blind judge whether a
    response's justification is right.
    root: a folder with easy-vqa's data layout (default: the installed package's; see data_root).

    Returns (images, skipped); images come in id order, so the same call gives the same list.
    """
    triples, paths = _read_split(split, data_root(root))
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in triples:
        by_image.setdefault(i, []).append((q, a))
    images: list[EasyVQAImage] = []
    skipped: list[Skipped] = []
    for i in sorted(by_image):
        if limit is not None and len(images) >= limit:
            break
        iid = f"{split}-{i}"
        path = paths.get(i)
        if not path or not Path(path).is_file():
            skipped.append(Skipped(iid, f"image file missing: {path or f'{split}/images/{i}.png'}"))
            continue
        try:
            facts = facts_from_questions(by_image[i])
            cov = coverage(path)
        except (ValueError, OSError) as e:  # an odd answer or an image that does not decode
            skipped.append(Skipped(iid, f"unreadable item: {e}"))
            continue
        missing = [k for k in ("color", "shape") if k not in facts]
        if missing:
            skipped.append(Skipped(iid, f"cannot infer {' and '.join(missing)} from the image's questions"))
            continue
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


def to_source_image(im: EasyVQAImage) -> Any:
    """An easy-vqa image as the data builder's SourceImage: the caption as context, the facts and
    questions (with gold answers) in meta, where the answer-grounded teacher reads them."""
    from perception_collection.rows import SourceImage

    return SourceImage(
        image_id=f"easyvqa-{im.id}", path=im.path, source="easyvqa", context=im.caption,
        meta={"facts": dict(im.facts), "questions": [asdict(q) for q in im.questions]},
    )


def balanced_subset(images: list[EasyVQAImage], n: int, seed: int = 0) -> list[EasyVQAImage]:
    """n images whose sizes, shapes and colours are as evenly spread as possible (id order kept).

    easy-vqa's are not even (57% large, 39% circles among the usable train images). Graded responses
    draw wrong claims uniformly from the other values, so with uneven facts a claimed value's prior
    says something about whether it is right ('large' usually is): a judge that never sees the
    image would learn that. Even facts keep every claimed value equally likely right or wrong.
    """
    import random

    pool = list(images)
    random.Random(seed).shuffle(pool)
    counts: dict[tuple[str, str], int] = {}
    picked: list[EasyVQAImage] = []
    while pool and len(picked) < n:
        # the image whose facts are rarest so far (greedy; exact balance whenever the pool allows)
        best = min(range(len(pool)), key=lambda i: sum(counts.get((k, v), 0) for k, v in pool[i].facts.items()))
        im = pool.pop(best)
        picked.append(im)
        for kv in im.facts.items():
            counts[kv] = counts.get(kv, 0) + 1
    order = {im.id: k for k, im in enumerate(images)}
    return sorted(picked, key=lambda im: order[im.id])


def load_source(split: str = "train", limit: int | None = None,
                root: str | None = None) -> tuple[list[Any], list[Any]]:
    """easy-vqa as a data-builder source: (SourceImage list, Drop list with the reason per image left out).

    limit: at most this many images, chosen with even sizes, shapes and colours (balanced_subset;
    deterministic). root: see data_root.
    """
    from perception_collection.rows import Drop

    images, skipped = load_easyvqa(split, root=root)  # type: ignore[arg-type]
    if limit is not None and limit < len(images):
        images = balanced_subset(images, limit)
    return [to_source_image(im) for im in images], [Drop(f"easyvqa-{s.id}", "source", s.reason) for s in skipped]
