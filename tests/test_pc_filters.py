"""Quality filters on joined examples about real photos: what is dropped, by which filter, and why."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from perception_collection.filters import (
    FilterConfig,
    apply_filters,
    dedup_texts,
    jaccard,
    length_ratio,
    score_histogram,
    shingles,
    stated_verdicts,
)
from perception_collection.rows import Example
from tests.pc_examples import make_group, make_image
from vlm_judge.records import Rubric


def _with(ex: Example, **resp) -> Example:
    return replace(ex, response=replace(ex.response, **resp))


def _check_partition(examples, kept, drops):
    ids = [e.id for e in examples]
    assert sorted([e.id for e in kept] + [d.id for d in drops]) == sorted(ids)


@pytest.fixture
def images(sample_images):
    return [make_image(p, image_id=name) for name, p in sample_images.items()]


def test_clean_groups_pass_and_histogram_is_flat(images):
    examples = [ex for im in images[:2] for ex in make_group(im, instruction=f"Describe {im.image_id}'s colours.")]
    kept, drops = apply_filters(examples, FilterConfig())
    assert drops == []
    assert [e.id for e in kept] == [e.id for e in examples]
    assert score_histogram(kept) == {1: 2, 2: 2, 3: 2, 4: 2, 5: 2}


def test_schema_drops_name_the_problem_and_the_group_follows(images, tmp_path):
    a, b, c, d, e = images[0], images[1], images[2], images[3], make_image(tmp_path / "gone.png", "gone")
    g_empty = make_group(a)
    g_empty[2] = _with(g_empty[2], response="  ")
    g_score = make_group(b)
    g_score[4] = _with(g_score[4], score=7)
    g_rubric = make_group(c, rubric=Rubric("Is the colour right?"))
    g_short = make_group(d)
    g_short[0] = _with(g_short[0], feedback="Wrong.")
    g_file = make_group(e)
    examples = g_empty + g_score + g_rubric + g_short + g_file + make_group(a)[:1]  # last: a duplicate id
    kept, drops = apply_filters(examples, FilterConfig(instruction_dedup_scope="image"))
    _check_partition(examples, kept, drops)
    assert kept == []
    why = {(d.id, d.stage): d.reason for d in drops}
    assert why[("astronaut/r0/i0/s3", "schema")] == "response is empty"
    assert "score must be an integer 1..5, got 7" in why[("chelsea/r0/i0/s5", "schema")]
    assert why[("coffee/r0/i0/s1", "schema")] == "rubric has no five score descriptions"
    assert "feedback has 1 words, fewer than min_feedback_words=8" in why[("rocket/r0/i0/s1", "schema")]
    assert why[("gone/r0/i0/s2", "schema")].startswith("image file not found")
    assert "duplicate id" in [d for d in drops if d.id == "astronaut/r0/i0/s1" and d.stage == "schema"][0].reason
    # the surviving rows of a group that lost one are dropped as incomplete, with their scores listed
    assert "has scores [1, 2, 4, 5]" in why[("astronaut/r0/i0/s1", "complete_group")]
    assert "has scores [1, 2, 3, 4]" in why[("chelsea/r0/i0/s1", "complete_group")]


def test_ids_that_do_not_join_are_schema_errors(images):
    g = make_group(images[0])
    g[1] = replace(g[1], instruction=replace(g[1].instruction, instruction_id="other/i9"))
    kept, drops = apply_filters(g, FilterConfig(require_all_scores=False, score_balance=False))
    assert [d.stage for d in drops] == ["schema"]
    assert "ids do not join" in drops[0].reason and len(kept) == 4


def test_feedback_stating_another_score_is_dropped(images):
    g = make_group(images[0])
    g[4] = _with(g[4], feedback=g[4].response.feedback + " For these reasons I would give it a score of 3.")
    g[3] = _with(g[3], feedback=g[3].response.feedback + " So the overall score is 4.")  # agrees: kept
    g[1] = _with(g[1], feedback="The reference answer, which earns a score of 5, names the cat; this one names a dog.")
    g[2] = _with(g[2], feedback="The response gives 4, but the photo shows 1 cat and its colours are wrong.")
    kept, drops = apply_filters(g, FilterConfig(require_all_scores=False, score_balance=False))
    assert [(d.id, d.stage) for d in drops] == [("astronaut/r0/i0/s5", "consistency")]
    assert "feedback states score 3" in drops[0].reason and "gold score is 5" in drops[0].reason
    assert len(kept) == 4
    off, _ = apply_filters(g, FilterConfig(require_all_scores=False, score_balance=False, check_consistency=False))
    assert len(off) == 5


@pytest.mark.parametrize("text,expected", [
    ("The cat is right. [RESULT] 2", [2]),
    ("Clear and correct, so the overall score is 5.", [5]),
    ("It deserves a 1 because nothing matches.", [1]),
    ("I rate it two out of five.", [2]),
    ("Score: 4", [4]),
    ("The response names 3 out of 5 objects and gives 2, not 4.", []),
    ("There are 2-3 people, score 1 to 5 aside.", []),
])
def test_stated_verdicts(text, expected):
    assert [v for v, _ in stated_verdicts(text)] == expected


def test_near_duplicate_responses_in_a_group(images):
    g = make_group(images[0])
    g[4] = _with(g[4], response=g[3].response.response)  # the teacher wrote the same text for 4 and 5
    kept, drops = apply_filters(g, FilterConfig())
    nd = [d for d in drops if d.stage == "near_duplicate"]
    assert [d.id for d in nd] == ["astronaut/r0/i0/s5"]
    assert "near-duplicate of astronaut/r0/i0/s4 (score 4, similarity 1.00)" in nd[0].reason
    assert kept == [] and {d.stage for d in drops} == {"near_duplicate", "complete_group"}
    # one detail apart is a graded ladder, not a duplicate
    g2 = make_group(images[1])
    g2[4] = _with(g2[4], response=g2[3].response.response.replace("red", "orange"))
    kept2, drops2 = apply_filters(g2, FilterConfig())
    assert drops2 == [] and len(kept2) == 5


def test_length_balance_drops_the_whole_group(images):
    g = make_group(images[0])
    g[4] = _with(g[4], response=" ".join([g[4].response.response] * 4))
    assert length_ratio([e.response.response for e in g]) > 3
    kept, drops = apply_filters(g, FilterConfig())
    assert kept == [] and len(drops) == 5 and {d.stage for d in drops} == {"length_balance"}
    assert "max_length_ratio=3.0" in drops[0].reason
    kept, drops = apply_filters(g, FilterConfig(max_length_ratio=0))
    assert len(kept) == 5


def test_instruction_near_duplicates_across_run_or_per_image(images):
    a = make_group(images[0], instruction="What colour is the cloth under the animal?")
    b = make_group(images[1], instruction="What colour is the cloth under the animal")
    c = make_group(images[0], k=1, instruction="What colour is the cloth under the animal?!")
    kept, drops = apply_filters(a + b + c, FilterConfig())
    assert {e.group_id for e in kept} == {"astronaut/r0/i0"}
    assert all(d.stage == "near_duplicate" and "near-duplicate of group astronaut/r0/i0" in d.reason for d in drops)
    assert "instruction_dedup_scope='image'" in drops[0].reason
    kept, drops = apply_filters(a + b + c, FilterConfig(instruction_dedup_scope="image"))
    assert {e.group_id for e in kept} == {"astronaut/r0/i0", "chelsea/r0/i0"}
    assert {d.id.rsplit("/", 1)[0] for d in drops} == {"astronaut/r0/i1"}


def test_score_balance_without_complete_groups(images):
    full = make_group(images[0])
    partial = make_group(images[1], instruction="Name the colours you can see.")[:3]  # scores 1..3 only
    cfg = FilterConfig(require_all_scores=False)
    kept, drops = apply_filters(full + partial, cfg)
    assert score_histogram(kept) == {s: 1 for s in range(1, 6)}
    assert [d.id for d in drops] == [e.id for e in reversed(partial)]
    assert all(d.stage == "score_balance" and "more than the rarest score's 1" in d.reason for d in drops)
    kept, drops = apply_filters(full + partial, FilterConfig(require_all_scores=False, score_balance=False))
    assert score_histogram(kept) == {1: 2, 2: 2, 3: 2, 4: 1, 5: 1} and drops == []


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="instruction_dedup_scope"):
        FilterConfig(instruction_dedup_scope="everywhere")
    with pytest.raises(ValueError, match="max_length_ratio"):
        FilterConfig(max_length_ratio=0.5)


def test_length_ratio():
    assert length_ratio(["a b", "a b c d"]) == 2.0
    assert length_ratio(["a", ""]) == float("inf")
    assert length_ratio([]) == 1.0


def _brute(texts, t):
    sets = [shingles(x) for x in texts]
    kept = []
    for i, s in enumerate(sets):
        if not any(jaccard(s, sets[j]) >= t for j in kept):
            kept.append(i)
    return kept


def _corpus(n, seed):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 40))) for _ in range(n)]
    texts = []
    for b in base:
        texts.append(b)
        if rng.random() < 0.3:  # a near copy: one word changed or appended
            w = b.split()
            w[rng.randrange(len(w))] = rng.choice(vocab) if rng.random() < 0.5 else w[0]
            texts.append(" ".join(w + ([rng.choice(vocab)] if rng.random() < 0.5 else [])))
    return texts


def test_dedup_texts_is_exact_and_fast():
    assert dedup_texts(["The cat is on the mat.", "the cat is on the mat", "A dog runs."], 0.9) == [0, 2]
    texts = _corpus(400, 0)
    for t in (0.5, 0.7, 0.9):
        assert dedup_texts(texts, t) == _brute(texts, t)
    big = _corpus(4000, 1)
    start = time.perf_counter()
    kept = dedup_texts(big, 0.8)
    assert time.perf_counter() - start < 3.0
    assert len(big) * 0.7 < len(kept) < len(big)
