"""Records validate where a row enters: each bad value fails with the field's name."""

from __future__ import annotations

import pytest

from vlm_judge.records import ImageRef, JudgeRequest, Judgment, RecordError, Rubric

DESCS = ("wrong", "mostly wrong", "half right", "mostly right", "right")


def rubric() -> Rubric:
    return Rubric("Is the count correct?", DESCS)


def test_rubric_text_round_trip_and_dict_round_trip():
    rb = rubric()
    assert Rubric.from_text(rb.to_text()) == rb
    assert Rubric.from_dict(rb.to_dict()) == rb
    assert rb.to_text().splitlines()[0] == "[Is the count correct?]"
    assert rb.complete and not Rubric("criteria only").complete


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Rubric(""), "criteria"),
        (lambda: Rubric("c", DESCS[:4]), "five"),
        (lambda: Rubric("c", DESCS[:4] + (" ",)), "five"),
        (lambda: Rubric.from_text("[c]\nScore 1: a\nScore 2: b\nScore 3: c"), "3 of 5"),
        (lambda: JudgeRequest("", "r", rubric()), "instruction"),
        (lambda: JudgeRequest("i", "  ", rubric()), "response"),
        (lambda: JudgeRequest("i", "r", Rubric("criteria only")), "five score descriptions"),
        (lambda: JudgeRequest("i", "r", rubric(), mode="relative"), "two responses"),
        (lambda: JudgeRequest("i", "r", rubric(), response_b="b"), "one response"),
        (lambda: JudgeRequest("i", "r", rubric(), mode="pairwise"), "mode"),
        (lambda: JudgeRequest("i", "r", {"criteria": "c"}), "Rubric"),
        (lambda: Judgment("x", "absolute", 6), "1..5"),
        (lambda: Judgment("x", "relative", 3), "A, B or tie"),
        (lambda: ImageRef(), "exactly one"),
        (lambda: ImageRef(path="a.png", data=b"x"), "exactly one"),
    ],
)
def test_bad_records_fail_naming_the_problem(make, needle):
    with pytest.raises(RecordError, match=needle):
        make()


def test_relative_request_needs_only_criteria_and_ids_become_strings():
    req = JudgeRequest("i", "a", Rubric("Which is more accurate?"), response_b="b", id=7, mode="relative")
    assert req.id == "7" and req.mode == "relative"


def test_image_keys_group_identical_images(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"png")
    a, b = ImageRef(path=str(p)), ImageRef(path=str(tmp_path / "." / "x.png"))
    assert a.key == b.key  # the same file by two spellings is one image
    assert ImageRef(data=b"123").key == ImageRef(data=b"123").key != ImageRef(data=b"124").key
    req = JudgeRequest("i", "r", rubric(), images=[a, ImageRef(data=b"123")])
    assert isinstance(req.images, tuple) and req.image_key == a.key + "|" + ImageRef(data=b"123").key
    assert "123" not in repr(ImageRef(data=b"123"))  # bytes never printed


def test_a_parse_failure_is_data_not_a_default_score():
    j = Judgment("r1", "absolute", None, status="parse_failure", reason="no score found")
    d = j.to_dict()
    assert d["score"] is None and d["status"] == "parse_failure" and d["reason"] == "no score found"
