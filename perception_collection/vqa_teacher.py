"""The answer-grounded teacher: graded responses and feedback written from a VQA item's known answer.

For a dataset with gold answers (and known facts about each image) no teacher model is needed:
per question we write one rubric on answer correctness, five responses of graded quality and the
feedback for each, citing the gold answer.

Every response has the same shape: an answer to the question, then a justification that states
two further facts about the image (for 'what colour is the shape?': its size and its shape). The
score counts what is right:

    score = 1 + 2 * [answer right] + [first stated fact right] + [second stated fact right]

so 5 is a correct, fully justified answer and 1 a wrong answer whose justification is wrong in every
detail. The answer and the stated facts are about *different* facts of the image, each wrong value
is drawn uniformly from the other values, and the phrasing is drawn independently of the score:
the text alone carries no information about the score (the response is equally fluent at every
level). Only a judge that looks at the image, or is told what it shows, can grade these
responses - which is what the demo's learning proof measures.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from perception_collection.rows import TeacherError
from vlm_judge.prompts import format_target
from vlm_judge.records import Rubric

RUBRIC = Rubric(
    criteria="Does the response answer the question about the image correctly, and are the details it gives "
    "as justification true of the image?",
    score_descriptions=(
        "The answer is wrong and every detail given as justification contradicts the image.",
        "The answer is wrong and only one detail of the justification matches the image.",
        "Either the answer is right but no detail of the justification matches the image, or the answer "
        "is wrong although the justification describes the image correctly.",
        "The answer is right, but one detail of the justification contradicts the image.",
        "The answer is right and every detail of the justification matches the image.",
    ),
)

# Combinations of (answer right, first fact right, second fact right) for each score.
_COMBOS: dict[int, list[tuple[bool, bool, bool]]] = {
    5: [(True, True, True)],
    4: [(True, True, False), (True, False, True)],
    3: [(True, False, False), (False, True, True)],
    2: [(False, True, False), (False, False, True)],
    1: [(False, False, False)],
}

# Phrasings per asked fact; {ans} is the answer, {a}/{b} the two stated facts in the order of
# _JUSTIFIES. Chosen at random, independently of the score.
_JUSTIFIES: dict[str, tuple[str, str]] = {"color": ("size", "shape"), "shape": ("size", "color"), "size": ("color", "shape")}
_PHRASES: dict[str, tuple[str, ...]] = {
    "color": ("It is {ans}. The shape is a {a} {b}.", "{Ans}: I can see a {a} {b} in the image.",
              "The {a} {b} in the picture is {ans}."),
    "shape": ("It is a {ans}. The shape is {a} and {b}.", "{Ans}: I can see a {a} {b} shape in the image.",
              "The {a} {b} shape in the picture is a {ans}."),
    "size": ("It is {ans}. The shape is a {a} {b}.", "{Ans}: I can see a {a} {b} in the image.",
             "The {a} {b} in the picture is {ans}."),
}


@dataclass(frozen=True)
class GradedResponse:
    """One response with its gold score and the feedback that explains the score."""

    score: int
    response: str
    feedback: str
    """Feedback citing the gold answer (without the verdict sentence)."""
    claims: dict[str, str]
    """What the response states: {'answer': ..., fact: value, ...}."""

    @property
    def target(self) -> str:
        """The training target: feedback then the verdict, in the form the parser reads."""
        return format_target(self.feedback, self.score)


def _other(value: str, values: Sequence[str], rng: random.Random) -> str:
    choices = [v for v in values if v != value]
    if not choices:
        raise ValueError(f"no wrong value available for {value!r}")
    return rng.choice(choices)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def describe(facts: Mapping[str, str]) -> str:
    """'a small blue circle' from the facts."""
    words = " ".join(facts[k] for k in ("size", "color", "shape") if k in facts)
    return f"{_article(words)} {words}"


def feedback_for(
    question_asks: str, gold: str, facts: Mapping[str, str], claims: Mapping[str, str], stated: Sequence[str]
) -> str:
    """Feedback citing the gold answer, then each claim of the response set against the image.

    Each check puts the claim, what the image shows and the verdict side by side ('Size small,
    image large: wrong.'), so a verdict follows from the two words right before it: a small judge
    learns such local checks fastest, and short feedback keeps CPU training cheap.
    """
    def verdict(ok: bool) -> str:
        return "right" if ok else "wrong"

    parts = [f"Answer {claims['answer']}, image {gold}: {verdict(claims['answer'] == gold)}."]
    parts += [f"{k.capitalize()} {claims[k]}, image {facts[k]}: {verdict(claims[k] == facts[k])}." for k in stated]
    return " ".join(parts)


def graded_responses(
    asks: str,
    gold: str,
    facts: Mapping[str, str],
    values: Mapping[str, Sequence[str]],
    rng: random.Random,
) -> list[GradedResponse]:
    """Five responses (scores 1..5) to one question whose gold answer is `gold`.

    asks: which fact the question asks about ('color', 'shape' or 'size'); gold must equal facts[asks].
    values: every possible value of each fact (the wrong answers and wrong details are drawn from them).
    """
    if asks not in _JUSTIFIES:
        raise ValueError(f"the answer-grounded teacher grades questions about {sorted(_JUSTIFIES)}, not {asks!r}")
    if facts.get(asks) != gold:
        raise ValueError(f"gold answer {gold!r} does not match the image's {asks} {facts.get(asks)!r}")
    stated = _JUSTIFIES[asks]
    missing = [k for k in stated if k not in facts]
    if missing:
        raise ValueError(f"the image has no known {', '.join(missing)} to justify an answer with")
    out = []
    for score in (5, 4, 3, 2, 1):
        ans_ok, a_ok, b_ok = rng.choice(_COMBOS[score])
        claims = {
            "answer": gold if ans_ok else _other(gold, values[asks], rng),
            stated[0]: facts[stated[0]] if a_ok else _other(facts[stated[0]], values[stated[0]], rng),
            stated[1]: facts[stated[1]] if b_ok else _other(facts[stated[1]], values[stated[1]], rng),
        }
        phrase = rng.choice(_PHRASES[asks])
        text = phrase.format(ans=claims["answer"], Ans=claims["answer"].capitalize(),
                             a=claims[stated[0]], b=claims[stated[1]])
        text = text.replace(" a a", " an a").replace(" a e", " an e")  # 'an' before a vowel-initial word
        out.append(GradedResponse(score, text, feedback_for(asks, gold, facts, claims, stated), claims))
    return out


def reference_answer(asks: str, gold: str, facts: Mapping[str, str]) -> str:
    """An answer that earns a 5 (the published schema's reference answer)."""
    a, b = _JUSTIFIES[asks]
    return f"It is {gold}; the image shows {describe(facts)}."


def perception_rows(
    image: Any,
    question: str,
    asks: str,
    gold: str,
    facts: Mapping[str, str],
    values: Mapping[str, Sequence[str]],
    rng: random.Random,
    rubric: Rubric = RUBRIC,
    with_reference: bool = True,
) -> list[dict[str, Any]]:
    """The five graded responses to one question as rows in the published Perception Collection schema.

    with_reference: include the reference answer. It states the image's facts, so data meant to
    show what a judge learns from the image itself (the demo's learning proof) leaves it out.
    """
    ref = reference_answer(asks, gold, facts) if with_reference else ""
    rows = []
    for g in graded_responses(asks, gold, facts, values, rng):
        row: dict[str, Any] = {
            "image": image,
            "instruction": question,
            "output": g.target,
            "orig_instruction": question,
            "orig_response": g.response,
            "orig_reference_answer": ref,
            "orig_criteria": rubric.criteria,
            "orig_feedback": g.feedback,
            "orig_score": str(g.score),
        }
        row.update({f"orig_score{i}_description": d for i, d in enumerate(rubric.score_descriptions, 1)})
        rows.append(row)
    return rows


# ---- the Teacher protocol (perception_collection.rows.Teacher) -----------------------------------

_QUESTION_FOR = {
    # our own wording for a question about each fact (noisy instructions, facts with no question)
    "color": "What is the color of the shape in this picture?",
    "shape": "Which kind of shape does this picture show?",
    "size": "Is the shape in this picture small or large?",
}


def _asks_from_wording(instruction: str) -> str | None:
    """The fact a question asks about, from its words (for questions not among the image's own)."""
    words = instruction.lower()
    for key, cues in (("color", ("color", "colour")), ("size", ("size", "small", "large", "big")),
                      ("shape", ("shape", "kind of"))):
        if any(c in words for c in cues):
            return key
    return None


class AnswerGroundedTeacher:
    """The data builder's teacher for images with known facts and gold answers (easy-vqa): no model.

    Reads `SourceImage.meta` as written by `sources_easyvqa.load_source`: `facts` ({'color', 'shape',
    'size'}) and `questions` ([{'question', 'answer', 'asks'}]). Every output is a deterministic
    function of (seed, image id, instruction), so concurrent calls and resumed runs agree.

    with_reference: give each instruction its reference answer. The reference states the image's
    facts, so data meant to show what a judge learns from the image itself leaves it out.
    """

    name = "answer_grounded"

    def __init__(self, seed: int = 0, with_reference: bool = True,
                 values: Mapping[str, Sequence[str]] | None = None) -> None:
        from perception_collection.sources_easyvqa import COLORS, SHAPES, SIZES

        self.seed = seed
        self.with_reference = with_reference
        self.values = dict(values or {"color": COLORS, "shape": SHAPES, "size": SIZES})

    # -- helpers ----------------------------------------------------------------------------------

    def _rng(self, image: Any, instruction: str) -> random.Random:
        return random.Random(f"{self.seed}/{image.image_id}/{instruction}")  # str seeds are stable across runs

    def _facts(self, image: Any) -> dict[str, str]:
        facts = (image.meta or {}).get("facts")
        if not isinstance(facts, dict) or not all(k in facts for k in self.values):
            raise TeacherError(f"{image.image_id}: no known {'/'.join(self.values)} facts in meta['facts'] "
                               "(the answer-grounded teacher needs an easy-vqa source)")
        return {k: str(facts[k]) for k in self.values}

    def _asks(self, image: Any, instruction: str) -> str:
        for q in (image.meta or {}).get("questions", []):
            if q.get("question") == instruction:
                return str(q["asks"])
        asks = _asks_from_wording(instruction)
        if asks is None or asks not in _JUSTIFIES:
            raise TeacherError(f"{image.image_id}: cannot tell which fact {instruction!r} asks about")
        return asks

    # -- the protocol -----------------------------------------------------------------------------

    def rubrics(self, image: Any, seeds: Sequence[Any], n: int) -> list[tuple[Rubric, str]]:
        """The one rubric this teacher grades by: answer correctness with a justified answer."""
        self._facts(image)
        return [(RUBRIC, "answer_correctness")][: max(0, n)]

    def instructions(self, image: Any, rubric: Rubric, n: int) -> list[tuple[str, str]]:
        """The image's own easy-vqa questions (that the teacher can grade), with reference answers,
        in an order seeded by (seed, image id)."""
        facts = self._facts(image)
        out = []
        for q in (image.meta or {}).get("questions", []):
            if q.get("asks") not in _JUSTIFIES or facts.get(q["asks"]) != q.get("answer"):
                continue  # a yes/no question, or a gold answer that contradicts the facts
            ref = reference_answer(q["asks"], q["answer"], facts) if self.with_reference else ""
            out.append((str(q["question"]), ref))
        if not out:
            raise TeacherError(f"{image.image_id}: no question about colour, shape or size in meta['questions']")
        # a seeded order, so asking for fewer than an image has mixes question kinds across images
        # (easy-vqa lists shape questions first far more often than colour ones)
        self._rng(image, "instructions").shuffle(out)
        return out[: max(0, n)]

    def responses(self, image: Any, rubric: Rubric, instruction: str, reference_answer: str,
                  scores: Sequence[int] = (1, 2, 3, 4, 5)) -> dict[int, tuple[str, str]]:
        """(response, feedback) for each requested score: five graded responses, kept as asked."""
        facts = self._facts(image)
        asks = self._asks(image, instruction)
        try:
            graded = graded_responses(asks, facts[asks], facts, self.values, self._rng(image, instruction))
        except ValueError as e:
            raise TeacherError(f"{image.image_id}: {e}") from e
        by_score = {g.score: (g.response, g.feedback) for g in graded}
        bad = [s for s in scores if s not in by_score]
        if bad:
            raise TeacherError(f"scores must be 1..5, got {bad}")
        return {s: by_score[s] for s in scores}

    def noisy_instruction(self, image: Any, instruction: str) -> str:
        """A question about a different fact of the same image (its own question when it has one)."""
        asks = self._asks(image, instruction)
        others = [k for k in ("color", "shape", "size") if k != asks]
        kind = self._rng(image, "noisy:" + instruction).choice(others)
        for q in (image.meta or {}).get("questions", []):
            if q.get("asks") == kind:
                return str(q["question"])
        return _QUESTION_FOR[kind]

    def answer(self, image: Any, instruction: str) -> str:
        """The fully right answer (what earns a 5) to a question about one of the known facts."""
        facts = self._facts(image)
        asks = self._asks(image, instruction)
        return reference_answer(asks, facts[asks], facts)
