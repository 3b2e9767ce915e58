"""The one renderer: sections in the Prometheus order, both templates, reference / no reference,
vision wording only with images, braces survive, user template files, targets round-trip."""

from __future__ import annotations

import json

import pytest

from vlm_judge.parse import parse_output
from vlm_judge.prompts import TEMPLATES, format_target, get_template, render, swapped
from vlm_judge.records import ImageRef, JudgeRequest, Rubric

RB = Rubric("Does the answer count the apples correctly?", ("none", "few", "some", "most", "all"))
IMG = ImageRef(data=b"\x89PNG fake")


def req(ref: str | None = "There are three apples.", images=(), relative=False) -> JudgeRequest:
    return JudgeRequest(
        "How many apples are on the table?", "Three apples {and a pear}.", RB, reference_answer=ref,
        images=images, response_b="Two apples." if relative else None, mode="relative" if relative else "absolute",
    )


def positions(text: str, headers: list[str]) -> list[int]:
    pos = [text.find(h) for h in headers]
    assert all(p >= 0 for p in pos), (headers, text)
    return pos


def test_default_sections_present_and_in_prometheus_order():
    text = render(req()).user
    pos = positions(text, ["###Task Description:", "###The instruction to evaluate:", "###Response to evaluate:",
                           "###Reference Answer (Score 5):", "###Score Rubrics:", "###Feedback:"])
    assert pos == sorted(pos)
    assert text.rstrip().endswith("###Feedback:")
    assert RB.to_text() in text and "Score 5: all" in text


def test_prefix_template_puts_the_response_last():
    text = render(req(), "prefix").user
    pos = positions(text, ["###The instruction to evaluate:", "###Reference Answer (Score 5):", "###Score Rubrics:",
                           "###Response to evaluate:", "###Feedback:"])
    assert pos == sorted(pos)


# our own wording; the published templates (prometheus, prometheus-vision) keep theirs and are checked
# byte for byte in test_published_templates.py
OUR_TEMPLATES = ("default", "prefix")


@pytest.mark.parametrize("template", OUR_TEMPLATES)
def test_relative_sections_and_reference_optional(template):
    with_ref, no_ref = render(req(relative=True), template).user, render(req(None, relative=True), template).user
    for text in (with_ref, no_ref):
        positions(text, ["###Response A:", "###Response B:", "###Score Rubric:", "###Feedback:"])
        assert "Score 1:" not in text  # relative grading shows the criteria only
    assert "###Reference Answer:" in with_ref and "###Reference Answer" not in no_ref
    assert "winning answer" in with_ref and "winning answer" not in no_ref


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_reference_section_only_with_a_reference(template):
    assert "###Reference Answer" not in render(req(None), template).user
    assert "reference answer" not in render(req(None), template).user.lower()
    assert "There are three apples." in render(req(), template).user


@pytest.mark.parametrize("template", OUR_TEMPLATES)
def test_vision_wording_only_with_images(template):
    text_only, vision = render(req(), template), render(req(images=[IMG]), template)
    assert "image" not in text_only.user.lower()
    assert "An image is given" in vision.user
    assert vision.images == (IMG,) and text_only.images == ()
    assert vision.system == text_only.system and vision.system


def test_braces_in_responses_and_placeholders_in_values_survive():
    r = JudgeRequest("Print {response} as JSON", 'print({"a": 1}) {rubric}', RB)
    text = render(r).user
    assert "Print {response} as JSON" in text and 'print({"a": 1}) {rubric}' in text


def test_a_user_template_file_loads_and_renders(tmp_path):
    body = "Judge this.\nQ: {instruction}\nA: {response}\nRef: {reference_answer}\nRubric:\n{rubric}\nFeedback:"
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"absolute": {"body": body, "body_no_ref": body.replace("Ref: {reference_answer}\n", "")}}))
    t = get_template(str(f), "absolute")
    assert t.name == "mine"
    text = render(req(), t).user
    assert text.startswith("Judge this.\nQ: How many apples") and "Ref: There are three apples." in text
    assert "Ref:" not in render(req(None), t).user
    y = tmp_path / "mine.yaml"
    y.write_text("body: |\n  Q: {instruction}\n  A: {response}\n  {rubric}\nsystem: Be fair.\n")
    p = render(req(), str(y))
    assert p.system == "Be fair." and p.user.startswith("Q: How many apples")


def test_bad_template_files_fail_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="unknown template"):
        get_template(str(tmp_path / "nope.json"), "absolute")
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"body": "x", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown fields"):
        get_template(str(f), "absolute")
    f.write_text(json.dumps({"system": "x"}))
    with pytest.raises(ValueError, match="missing field 'body'"):
        get_template(str(f), "absolute")
    with pytest.raises(ValueError, match="relative"):
        render(req(), get_template("default", "relative"))


@pytest.mark.parametrize("verdict", [1, 2, 3, 4, 5, "A", "B"])
def test_format_target_round_trips_through_the_parser(verdict):
    target = format_target("  The count is right but the colour is not.  ", verdict)
    res = parse_output(target, "relative" if verdict in ("A", "B") else "absolute")
    assert res.ok and res.verdict == verdict
    assert res.feedback == "The count is right but the colour is not."
    with pytest.raises(ValueError):
        format_target("x", 0)


def test_swapped_exchanges_the_responses():
    r = req(relative=True)
    s = swapped(r)
    assert (s.response, s.response_b) == (r.response_b, r.response)
    assert "###Response A:\nTwo apples." in render(s).user
    with pytest.raises(ValueError):
        swapped(req())
