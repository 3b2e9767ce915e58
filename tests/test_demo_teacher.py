"""The answer-grounded teacher and the easy-vqa source: graded responses that only the image can grade."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest

from perception_collection.sources_easyvqa import (
    COLORS,
    SHAPES,
    SIZES,
    facts_from_questions,
    load_easyvqa,
    names_a_fact,
    size_of,
)
from perception_collection.vqa_teacher import RUBRIC, graded_responses, perception_rows
from vlm_judge.parse import parse_output

VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES}


def _random_item(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    facts = {k: rng.choice(v) for k, v in VALUES.items()}
    asks = rng.choice(["color", "shape"])
    return asks, facts[asks], facts


def test_five_responses_scored_by_what_is_right() -> None:
    rng = random.Random(0)
    for _ in range(200):
        asks, gold, facts = _random_item(rng)
        graded = graded_responses(asks, gold, facts, VALUES, rng)
        assert [g.score for g in graded] == [5, 4, 3, 2, 1]
        for g in graded:
            right = {k: (v == gold if k == "answer" else v == facts[k]) for k, v in g.claims.items()}
            stated = [k for k in g.claims if k != "answer"]
            assert asks not in stated, "the justification must not restate the asked fact"
            assert g.score == 1 + 2 * right["answer"] + sum(right[k] for k in stated)
            # every claim appears in the response and the feedback cites the gold answer
            assert all(v in g.response.lower() for v in g.claims.values())
            assert f"Answer {g.claims['answer']}, image {gold}:" in g.feedback
            res = parse_output(g.target)
            assert res.ok and res.verdict == g.score


def _words(text: str) -> list[str]:
    return [w.strip(".,:;()").lower() for w in text.split()]


def test_text_alone_does_not_reveal_the_score() -> None:
    """A naive-Bayes reader of question + response (what a blind judge sees) fitted on 4000 graded
    responses predicts held-out scores at chance, while the same reader told the image's facts
    (which claims are right) grades well."""
    rng = random.Random(1)
    rows = []
    for _ in range(1200):
        asks, gold, facts = _random_item(rng)
        q = f"what {asks} is the shape?"
        for g in graded_responses(asks, gold, facts, VALUES, rng):
            seen = _words(q) + _words(g.response)
            told = [f"{k}={'right' if (v == gold if k == 'answer' else v == facts[k]) else 'wrong'}"
                    for k, v in g.claims.items()]
            rows.append((seen, told, g.score))
    train, test = rows[:4000], rows[4000:]

    def nb_accuracy(view: int) -> float:
        counts: dict[int, Counter] = defaultdict(Counter)
        for r in train:
            counts[r[2]].update(r[view])
        vocab = {w for c in counts.values() for w in c}
        hits = 0
        for r in test:
            def ll(s: int, words: list[str] = r[view]) -> float:
                tot = sum(counts[s].values()) + len(vocab)
                return sum(math.log((counts[s][w] + 1) / tot) for w in words)
            hits += max(range(1, 6), key=ll) == r[2]
        return hits / len(test)

    blind, informed = nb_accuracy(0), nb_accuracy(1)
    assert blind < 0.3, f"the response text predicts the score ({blind:.2f} accuracy; chance is 0.2)"
    assert informed > 0.6, f"told which claims are right, the reader should grade well ({informed:.2f})"


def test_rows_follow_the_published_schema() -> None:
    rows = perception_rows("img.png", "what color is the shape?", "color", "red",
                           {"color": "red", "shape": "circle", "size": "small"}, VALUES, random.Random(0))
    assert len(rows) == 5
    for r in rows:
        assert r["image"] == "img.png" and r["orig_criteria"] == RUBRIC.criteria
        assert all(r[f"orig_score{i}_description"] for i in range(1, 6))
        assert parse_output(r["output"]).verdict == int(r["orig_score"])
    assert "circle" in rows[0]["orig_reference_answer"]
    blind = perception_rows("img.png", "what color is the shape?", "color", "red",
                            {"color": "red", "shape": "circle", "size": "small"}, VALUES, random.Random(0),
                            with_reference=False)
    assert all(r["orig_reference_answer"] == "" for r in blind)


def test_bad_items_are_refused_with_the_reason() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="does not match"):
        graded_responses("color", "blue", {"color": "red", "shape": "circle", "size": "small"}, VALUES, rng)
    with pytest.raises(ValueError, match="no known size"):
        graded_responses("color", "red", {"color": "red", "shape": "circle"}, VALUES, rng)
    with pytest.raises(ValueError, match="grades questions about"):
        graded_responses("presence", "yes", {"color": "red"}, VALUES, rng)


def test_facts_from_questions() -> None:
    assert facts_from_questions([("what color is the circle?", "blue")]) == {"color": "blue", "shape": "circle"}
    assert facts_from_questions([("what is the red shape?", "triangle")]) == {"shape": "triangle", "color": "red"}
    # yes/no questions, negated or not; two absent shapes leave the third
    f = facts_from_questions([("is there not a teal shape?", "no"), ("does the image contain a circle?", "no"),
                              ("is there a rectangle in the image?", "no")])
    assert f == {"color": "teal", "shape": "triangle"}
    assert names_a_fact("what color is the circle?") and not names_a_fact("what color is the shape?")
    assert size_of(0.01) == "small" and size_of(0.2) == "large" and size_of(0.07) is None


def test_easyvqa_source_reads_real_images() -> None:
    images, skipped = load_easyvqa("test", limit=30)
    assert len(images) == 30
    assert all(s.reason for s in skipped)
    for im in images:
        assert set(im.facts) == {"color", "shape", "size"}
        assert im.questions and all(q.asks in ("color", "shape") and q.answer == im.facts[q.asks] for q in im.questions)
        assert all(not names_a_fact(q.question) for q in im.questions)
        assert im.facts["color"] in im.caption and im.facts["shape"] in im.caption
