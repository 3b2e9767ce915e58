"""The answer-grounded teacher behind the data builder's Teacher interface, on real easy-vqa images
read through `sources_easyvqa.load_source`; and the source's own folder layout and drop reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from perception_collection.rows import Drop, SourceImage, Teacher, TeacherError
from perception_collection.sources_easyvqa import load_source
from perception_collection.vqa_teacher import RUBRIC, AnswerGroundedTeacher
from vlm_judge.parse import parse_output
from vlm_judge.prompts import format_target


@pytest.fixture(scope="module")
def images() -> list[SourceImage]:
    pytest.importorskip("easy_vqa")
    ims, drops = load_source("test", limit=12)
    assert len(ims) == 12 and drops and all(isinstance(d, Drop) and d.stage == "source" and d.reason for d in drops)
    return ims


def test_source_images_carry_caption_facts_and_questions(images) -> None:
    for im in images:
        assert im.source == "easyvqa" and im.image_id.startswith("easyvqa-test-") and Path(im.path).is_file()
        facts = im.meta["facts"]
        assert set(facts) == {"color", "shape", "size"}
        assert all(v in im.context for v in facts.values())  # the caption states every fact
        assert im.meta["questions"] and all(q["answer"] == facts[q["asks"]] for q in im.meta["questions"])
        assert SourceImage.from_dict(json.loads(json.dumps(im.to_dict()))) == im  # survives the run folder


def test_teacher_implements_the_protocol(images) -> None:
    t = AnswerGroundedTeacher(seed=3)
    assert isinstance(t, Teacher) and t.name == "answer_grounded"
    im = images[0]
    rubrics = t.rubrics(im, [], 4)
    assert rubrics == [(RUBRIC, "answer_correctness")] and t.rubrics(im, [], 0) == []
    instr = t.instructions(im, RUBRIC, 5)
    assert sorted(q for q, _ in instr) == sorted(q["question"] for q in im.meta["questions"])[:5]
    assert t.instructions(im, RUBRIC, 5) == instr  # the same order every time
    for question, ref in instr:
        q = next(q for q in im.meta["questions"] if q["question"] == question)
        assert q["answer"] in ref and im.meta["facts"]["shape"] in ref  # a reference that earns a 5
        out = t.responses(im, RUBRIC, question, ref)
        assert sorted(out) == [1, 2, 3, 4, 5]
        for score, (response, feedback) in out.items():
            assert response and f", image {q['answer']}:" in feedback
            assert parse_output(format_target(feedback, score)).verdict == score
        # a subset of scores, and the same text on a re-run (resume) or from another instance
        assert t.responses(im, RUBRIC, question, ref, scores=(2, 5)) == {s: out[s] for s in (2, 5)}
        assert AnswerGroundedTeacher(seed=3).responses(im, RUBRIC, question, ref) == out
        assert AnswerGroundedTeacher(seed=4).responses(im, RUBRIC, question, ref) != out


def test_scores_follow_what_the_response_gets_right(images) -> None:
    t = AnswerGroundedTeacher()
    for im in images:
        facts = im.meta["facts"]
        for question, ref in t.instructions(im, RUBRIC, 5):
            for score, (_, feedback) in t.responses(im, RUBRIC, question, ref).items():
                # 2 points for the answer, 1 per justification detail, from the feedback's checks
                checks = [c.strip() for c in feedback.split(".") if c.strip()]
                got = 1 + sum((2 if c.startswith("Answer") else 1) for c in checks if c.endswith("right"))
                assert got == score, (feedback, score)
                for c in checks[1:]:
                    key, claim = c.split(",")[0].lower().split(" ")
                    assert c.endswith("right") == (claim == facts[key])


def test_without_reference_and_noisy_instruction_and_answer(images) -> None:
    t = AnswerGroundedTeacher(with_reference=False)
    im = images[1]
    question, ref = t.instructions(im, RUBRIC, 1)[0]
    assert ref == ""  # the reference would state the facts the judge must read from the image
    asks = next(q["asks"] for q in im.meta["questions"] if q["question"] == question)
    noisy = t.noisy_instruction(im, question)
    assert noisy != question and t._asks(im, noisy) != asks  # a different fact of the same image
    assert t.responses(im, RUBRIC, noisy, "")  # and the teacher can grade answers to it
    good = t.answer(im, question)
    assert im.meta["facts"][asks] in good and all(v in good for v in im.meta["facts"].values())


def test_items_it_cannot_do_raise_teacher_error(images) -> None:
    t = AnswerGroundedTeacher()
    no_facts = SourceImage("folder-x.png", "x.png", "folder", context="a photo")
    with pytest.raises(TeacherError, match="facts"):
        t.rubrics(no_facts, [], 1)
    with pytest.raises(TeacherError, match="cannot tell which fact"):
        t.responses(images[0], RUBRIC, "how many legs does it have?", "")
    no_questions = SourceImage("easyvqa-x", images[0].path, "easyvqa", meta={"facts": images[0].meta["facts"],
                                                                              "questions": []})
    with pytest.raises(TeacherError, match="no question"):
        t.instructions(no_questions, RUBRIC, 3)
    with pytest.raises(TeacherError, match="scores must be"):
        t.responses(images[0], RUBRIC, images[0].meta["questions"][0]["question"], "", scores=(0,))


def test_source_reads_a_folder_with_the_easyvqa_layout(tmp_path) -> None:
    easy_vqa = pytest.importorskip("easy_vqa")
    src = Path(easy_vqa.__file__).resolve().parent / "data" / "test"
    qs = json.loads((src / "questions.json").read_text())
    ids = sorted({int(i) for _, _, i in qs})[:6]
    (tmp_path / "test" / "images").mkdir(parents=True)
    keep = [q for q in qs if int(q[2]) in ids]
    (tmp_path / "test" / "questions.json").write_text(json.dumps(keep))
    for i in ids[:-1]:  # the last image's file is missing
        shutil.copy(src / "images" / f"{i}.png", tmp_path / "test" / "images" / f"{i}.png")
    ims, drops = load_source("test", root=str(tmp_path))
    assert {d.id for d in drops if "missing" in d.reason} == {f"easyvqa-test-{ids[-1]}"}
    assert len(ims) + len(drops) == len(ids)
    assert all(Path(im.path).parent == tmp_path / "test" / "images" for im in ims)
    with pytest.raises(ValueError, match="split"):
        load_source("validation")
    with pytest.raises(FileNotFoundError, match="questions"):
        load_source("train", root=str(tmp_path))
