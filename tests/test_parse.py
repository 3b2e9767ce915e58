"""parse_output: property tests (hypothesis) and a table of real-looking judge outputs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.samples import PROMETHEUS_VISION
from vlm_judge.parse import parse_output
from vlm_judge.prompts import render
from vlm_judge.records import JudgeRequest, Rubric

# The published sample rows: a copy in the repo if the lead adds one, else the shared folder.
SAMPLES = PROMETHEUS_VISION

# Feedback prose that cannot contain a verdict: no digits, brackets or colons.
PROSE = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ ,.;'\n")), max_size=300)
SCORE_FORMS = [
    "[RESULT] {n}",
    "[RESULT]: {n}",
    "[RESULT] ({n})",
    "So the overall score is {n}.",
    "So the overall score is {n}.\n[RESULT] {n}",
    "Score: {n}",
    "Final score: {n}",
    "{n}/5",
    "Overall score: {n}",
]
REL_FORMS = ["[RESULT] {v}", "[RESULT] Response {v}", "So the better response is {v}.\n[RESULT] {v}", "Winner: {v}"]


@settings(max_examples=150, deadline=None)
@given(PROSE, st.sampled_from(SCORE_FORMS), st.integers(1, 5))
def test_any_feedback_ending_in_a_score_form_parses_to_it(feedback, form, n):
    res = parse_output(f"Feedback: {feedback} " + form.format(n=n), "absolute")
    assert res.ok and res.verdict == n, res
    assert "[RESULT]" not in res.feedback and "overall score is" not in res.feedback


@settings(max_examples=100, deadline=None)
@given(PROSE, st.sampled_from(REL_FORMS), st.sampled_from(["A", "B"]))
def test_any_feedback_ending_in_an_ab_form_parses_to_it(feedback, form, v):
    res = parse_output(f"Feedback: {feedback} " + form.format(v=v), "relative")
    assert res.ok and res.verdict == v, res


@settings(max_examples=100, deadline=None)
@given(PROSE, st.sampled_from(SCORE_FORMS), st.integers(1, 5), st.sampled_from(SCORE_FORMS), st.integers(1, 5))
def test_the_last_verdict_wins(middle, form1, first, form2, last):
    text = "Feedback: " + form1.format(n=first) + " " + middle + " On reflection, " + form2.format(n=last)
    assert parse_output(text).verdict == last


@settings(max_examples=100, deadline=None)
@given(PROSE, st.sampled_from([f for f in SCORE_FORMS if "/5" not in f]),
       st.integers(-50, 500).filter(lambda n: not 1 <= n <= 5))
def test_scores_outside_1_to_5_are_rejected_with_a_reason(feedback, form, n):
    res = parse_output(f"Feedback: {feedback} " + form.format(n=n))
    assert not res.ok and res.verdict is None
    assert f"{n} is outside 1..5" in res.reason


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=400))
def test_text_without_a_number_never_parses_as_a_score(text):
    res = parse_output(text, "absolute")
    assert not res.ok and res.verdict is None and res.reason


@settings(max_examples=100, deadline=None)
@given(PROSE.filter(lambda t: "better response" not in t.lower()))
def test_prose_without_a_verdict_never_parses_as_a_preference(text):
    res = parse_output(text, "relative")
    assert not res.ok and res.reason


RUBRIC_TEXT = st.text(alphabet=st.sampled_from(list("abcdefghij klmnop.,")), min_size=1, max_size=40).filter(str.strip)


@settings(max_examples=100, deadline=None)
@given(RUBRIC_TEXT, st.lists(RUBRIC_TEXT, min_size=5, max_size=5))
def test_an_echoed_rubric_never_parses(criteria, descs):
    text = Rubric(criteria, tuple(descs)).to_text()
    assert not parse_output(text).ok
    assert not parse_output("Feedback: Looking at the rubric:\n" + text).ok


@settings(max_examples=50, deadline=None)
@given(RUBRIC_TEXT, st.lists(RUBRIC_TEXT, min_size=5, max_size=5), st.booleans())
def test_an_echoed_prompt_never_parses(criteria, descs, with_ref):
    rb = Rubric(criteria, tuple(descs))
    ref = "the best answer" if with_ref else None
    absolute = JudgeRequest("What is shown?", "A cat.", rb, reference_answer=ref)
    relative = JudgeRequest("What is shown?", "A cat.", rb, response_b="A dog.", reference_answer=ref, mode="relative")
    for template in ("default", "prefix"):
        assert not parse_output(render(absolute, template).user, "absolute").ok
        assert not parse_output(render(relative, template).user, "relative").ok


# (output, mode, verdict or None, substring of the reason when None)
TABLE = [
    ("Feedback: The answer names the colour correctly. [RESULT] 5", "absolute", 5, ""),
    ("The response misses two of the three objects. So the overall score is 2.\n[RESULT] 2", "absolute", 2, ""),
    ("Feedback: Some detail is wrong.\n\nScore: 3", "absolute", 3, ""),
    ("I would rate this 4/5 because the count is right but the colour is not.", "absolute", 4, ""),
    ("Feedback: good. [RESULT] 4 </s>", "absolute", 4, ""),
    ("Feedback: Score 5 needs all details; Score 4 allows one slip. This has one slip. [RESULT] 4", "absolute", 4, ""),
    ("Feedback: first I thought [RESULT] 2 but the rubric says [RESULT] 3", "absolute", 3, ""),
    ("Feedback: partly right [RESULT] 3.5", "absolute", None, "not an integer"),
    ("Feedback: excellent [RESULT] 9", "absolute", None, "outside 1..5"),
    ("Feedback: The response is fine but", "absolute", None, "no score found"),
    ("Feedback: The response is fine. [RESULT]", "absolute", None, "ends at '[RESULT]'"),
    ("Feedback: I give it 8/10.", "absolute", None, "no score found"),
    ("Score 1: wrong\nScore 2: mostly wrong\nScore 3: half", "absolute", None, "no score found"),
    ('Use this format: "Feedback: ... [RESULT] (an integer between 1 and 5)"', "absolute", None, "no score found"),
    ("", "absolute", None, "empty output"),
    ("Feedback: Response B counts the apples. So the better response is B.\n[RESULT] B", "relative", "B", ""),
    ("Feedback: both fine. [RESULT] A", "relative", "A", ""),
    ("Feedback: Response A is better than Response B. Verdict: tie", "relative", "tie", ""),
    ('Output format: "Feedback: (...) [RESULT] (A or B)"', "relative", None, "no A/B verdict"),
    ("Feedback: Response A describes the image.", "relative", None, "no A/B verdict"),
]


@pytest.mark.parametrize(("text", "mode", "verdict", "why"), TABLE)
def test_real_looking_outputs(text, mode, verdict, why):
    res = parse_output(text, mode)
    assert res.verdict == verdict, res
    assert res.ok == (verdict is not None)
    if verdict is None:
        assert why in res.reason


def test_feedback_is_the_text_before_the_verdict():
    res = parse_output("Feedback: The count is right. So the overall score is 4.\n[RESULT] 4")
    assert res.feedback == "The count is right."


def test_published_training_targets_parse_to_their_scores():
    rows = json.loads((SAMPLES / "sample_train_data.json").read_text())
    got = []
    for row in rows:
        target = next(t["value"] for t in row["conversations"] if t["from"] == "gpt")
        res = parse_output(target)
        assert res.ok, res.reason
        assert not res.feedback.endswith("[RESULT]") and "So the overall score" not in res.feedback
        got.append(res.verdict)
    assert got == [1, 2, 3]  # the README: three responses to one instruction scored 1, 2, 3
