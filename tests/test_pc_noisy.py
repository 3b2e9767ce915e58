"""The noisy-instruction stage with a scripted teacher on real photos: rows, drops, resume, torn
lines, bounded concurrency, and the rows read back by the trainer and the scorer."""

from __future__ import annotations

import json
import threading
import time

import pytest

from perception_collection.export import export_all
from perception_collection.noisy import noisy_pairs, read_done
from perception_collection.rows import Instruction, TeacherError
from tests.pc_examples import make_image
from train.data import RowContext, load_examples
from vlm_judge.inputs import read_requests


class ScriptedTeacher:
    """Swaps the asked-about word for a neighbour and answers from a fixed table; counts calls and
    the most calls running at once. `fail` maps an instruction to the error it raises."""

    name = "scripted"

    def __init__(self, fail: dict[str, Exception] | None = None, noisy_same: bool = False, same_answers: bool = False,
                 delay: float = 0.0) -> None:
        self.fail = fail or {}
        self.noisy_same = noisy_same
        self.same_answers = same_answers
        self.delay = delay
        self.calls: list[tuple[str, str]] = []
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def _enter(self, kind: str, text: str) -> None:
        with self.lock:
            self.calls.append((kind, text))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        if text in self.fail:
            raise self.fail[text]

    def noisy_instruction(self, image, instruction):
        self._enter("noisy", instruction)
        return instruction if self.noisy_same else instruction.replace("colour", "shape")

    def answer(self, image, instruction):
        self._enter("answer", instruction)
        if self.same_answers:
            return "A cat on a cloth."
        what = "shape" if "shape" in instruction else "colour"
        return f"In {image.image_id}, the {what} of the main subject is described: this answers the {what} question."


@pytest.fixture
def items(sample_images):
    out = []
    for name, path in sample_images.items():
        im = make_image(path, image_id=name)
        ins = Instruction(f"{name}/r0/i0", f"{name}/r0", name, f"What colour is the main subject in the {name} photo?",
                          "ref")
        out.append((im, ins))
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_drops_and_loaders(items, tmp_path):
    bad = items[1][1].instruction
    teacher = ScriptedTeacher(fail={bad: TeacherError("server returned 500 three times")})
    out = tmp_path / "noisy.jsonl"
    rows, drops = noisy_pairs(items, teacher, out, concurrency=2)
    assert [r["id"] for r in rows] == [f"{n}/r0/i0/noisy" for n in ("astronaut", "coffee", "rocket")]
    assert [(d.id, d.stage, d.reason) for d in drops] == [("chelsea/r0/i0/noisy", "noisy", "server returned 500 three times")]
    assert sorted(_lines(out), key=lambda r: r["id"]) == rows  # the file holds exactly these rows
    for r in rows:
        winner = r["orig_response_A"] if r["orig_preference"] == "A" else r["orig_response_B"]
        loser = r["orig_response_B"] if r["orig_preference"] == "A" else r["orig_response_A"]
        assert "colour question" in winner and "shape question" in loser  # the real instruction's answer wins
        assert r["noisy_instruction"] == r["orig_instruction"].replace("colour", "shape")
        assert r["noisy_instruction"] in r["orig_feedback"]
    # the rows enter the exported pairwise file with their images, and both loaders read them
    written = export_all([], tmp_path / "export", ["pairwise"], extra_pairs=rows)
    exported = _lines(tmp_path / "export" / "pairwise.jsonl")
    assert len(exported) == 3 and all(r["image"].startswith("images/") for r in exported)
    exs, report = load_examples([written["pairwise"]], RowContext())
    assert len(exs) == 3 and not report.skipped, report.summary()
    assert [e.verdict for e in exs] == [r["orig_preference"] for r in rows]
    reqs = list(read_requests(written["pairwise"]))
    assert all(q.mode == "relative" and len(q.images) == 1 for _, q in reqs)


def test_resume_skips_done_items_and_retries_failed_ones(items, tmp_path):
    out = tmp_path / "noisy.jsonl"
    first = ScriptedTeacher(fail={items[2][1].instruction: TeacherError("timeout")})
    rows1, drops1 = noisy_pairs(items, first, out)
    assert len(rows1) == 3 and len(drops1) == 1
    second = ScriptedTeacher()
    rows2, drops2 = noisy_pairs(items, second, out)
    assert drops2 == [] and len(rows2) == 4
    # only the failed item was asked again: one noisy instruction and two answers
    assert [k for k, _ in second.calls] == ["noisy", "answer", "answer"]
    assert all(items[2][1].instruction in t or "shape" in t for _, t in second.calls)
    ids = [r["id"] for r in _lines(out)]
    assert len(ids) == len(set(ids)) == 4
    third = ScriptedTeacher()
    rows3, _ = noisy_pairs(items + items[:1], third, out)  # an item listed twice: one row
    assert third.calls == [] and [r["id"] for r in rows3] == [r["id"] for r in rows2]


def test_torn_last_line_is_repaired(items, tmp_path):
    out = tmp_path / "noisy.jsonl"
    noisy_pairs(items[:2], ScriptedTeacher(), out)
    good = out.read_text()
    out.write_text(good + good.splitlines()[0][:40])  # a crash in the middle of writing a third row
    rows, drops = noisy_pairs(items, ScriptedTeacher(), out)
    assert len(rows) == 4 and not drops
    lines = _lines(out)  # every line parses again
    assert len(lines) == 4 and len({r["id"] for r in lines}) == 4
    # a complete last line without its newline is kept, and the next append starts a new line
    out.write_text(out.read_text().rstrip("\n"))
    assert len(read_done(out)) == 4 and out.read_text().endswith("\n")


def test_bad_line_in_the_middle_is_an_error(items, tmp_path):
    out = tmp_path / "noisy.jsonl"
    noisy_pairs(items[:2], ScriptedTeacher(), out)
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        noisy_pairs(items, ScriptedTeacher(), out)


@pytest.mark.parametrize("teacher,reason", [
    (ScriptedTeacher(noisy_same=True), "the noisy instruction is the original instruction again"),
    (ScriptedTeacher(same_answers=True), "both answers are the same text"),
])
def test_unusable_teacher_output_is_dropped(items, tmp_path, teacher, reason):
    rows, drops = noisy_pairs(items, teacher, tmp_path / "n.jsonl")
    assert rows == [] and len(drops) == 4 and all(reason in d.reason for d in drops)
    assert (tmp_path / "n.jsonl").read_text() == ""


def test_concurrency_is_bounded_and_bugs_propagate(items, tmp_path):
    many = [(im, Instruction(f"{ins.instruction_id}{k}", ins.rubric_id, ins.image_id, f"{ins.instruction} ({k})", "r"))
            for k in range(3) for im, ins in items]
    teacher = ScriptedTeacher(delay=0.01)
    rows, drops = noisy_pairs(many, teacher, tmp_path / "n.jsonl", concurrency=3)
    assert len(rows) == 12 and not drops
    assert 1 < teacher.max_running <= 3
    broken = ScriptedTeacher(fail={many[5][1].instruction: KeyError("a bug, not a teacher failure")})
    with pytest.raises(KeyError):
        noisy_pairs(many, broken, tmp_path / "m.jsonl", concurrency=1)
    kept = {r["id"] for r in _lines(tmp_path / "m.jsonl")}  # what finished before the bug is kept
    assert {f"{ins.instruction_id}/noisy" for _, ins in many[:5]} <= kept and len(kept) <= 6
    with pytest.raises(ValueError, match="concurrency"):
        noisy_pairs(many, teacher, tmp_path / "n.jsonl", concurrency=0)
