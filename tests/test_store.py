"""The judgment store: fingerprints over everything that decides a judgment, resume that retries
errors, one torn-tail rule, compaction in input order, and the lock on the output."""

from __future__ import annotations

import json
import shutil

import pytest

import vlm_judge.store as store_mod
from vlm_judge.backends import GenerationParams
from vlm_judge.backends.mock import MockBackend
from vlm_judge.jsonl import Locked
from vlm_judge.records import ImageRef, JudgeRequest, Rubric
from vlm_judge.scorer import Judge, ScorerConfig
from vlm_judge.store import FINGERPRINT, Fingerprinter, JudgmentStore

RUBRIC = Rubric("Is it right?", tuple(f"level {i}" for i in range(1, 6)))


def req(rid: str = "r1", **kw) -> JudgeRequest:
    return JudgeRequest(**{"instruction": "What is shown?", "response": "A cat.", "rubric": RUBRIC, "id": rid, **kw})


def fp_of(request: JudgeRequest, judge: Judge | None = None) -> str:
    return Fingerprinter(judge or Judge(MockBackend(), ScorerConfig()))(request)


def line(rid: str, status: str = "ok", fp: str = "f", score: int | None = 3) -> dict:
    return {"id": rid, "mode": "absolute", "score": score if status == "ok" else None, "status": status, FINGERPRINT: fp}


def test_fingerprint_covers_the_request_the_judge_and_its_settings(tmp_path):
    base = fp_of(req())
    assert fp_of(req()) == base  # stable run to run
    changed = [req(response="A dog."), req(instruction="What else?"), req(reference_answer="A cat."), req(rid="r2"),
               req(rubric=Rubric("Is it kind?", RUBRIC.score_descriptions))]
    assert all(fp_of(r) != base for r in changed)
    for cfg in (ScorerConfig(params=GenerationParams(temperature=0.5)), ScorerConfig(params=GenerationParams(max_new_tokens=9)),
                ScorerConfig(params=GenerationParams(top_p=0.9)), ScorerConfig(params=GenerationParams(seed=1)),
                ScorerConfig(max_parse_retries=0), ScorerConfig(swap=False), ScorerConfig(template="prefix"),
                ScorerConfig(n_samples=3, params=GenerationParams(temperature=0.7)), ScorerConfig(aggregate="majority")):
        assert fp_of(req(), Judge(MockBackend(), cfg)) != base, cfg
    assert fp_of(req(), Judge(MockBackend("other-judge"), ScorerConfig())) != base
    # batch size decides nothing about a judgment: same fingerprint
    assert fp_of(req(), Judge(MockBackend(), ScorerConfig(batch_size=1))) == base


def test_fingerprint_hashes_image_bytes_not_only_the_path(tmp_path, sample_images):
    img = tmp_path / "photo.png"
    shutil.copy(sample_images["astronaut"], img)
    r = req(images=(ImageRef(path=str(img)),))
    first = fp_of(r)
    assert fp_of(r) == first
    shutil.copy(sample_images["chelsea"], img)  # same path, other picture
    assert fp_of(r) != first
    data = sample_images["coffee"].read_bytes()
    inline = fp_of(req(images=(ImageRef(data=data),)))
    assert inline != fp_of(req(images=(ImageRef(data=data + b"\0"),)))
    (tmp_path / "copy.png").write_bytes(data)  # the same bytes from a file or inline: the same image
    assert fp_of(req(images=(ImageRef(path=str(tmp_path / "copy.png")),))) == inline


def test_template_text_counts_and_prompt_format_version_not_package_version(tmp_path, monkeypatch):
    t = tmp_path / "mine.yaml"
    t.write_text("body: |\n  Q: {instruction}\n  A: {response}\n  {rubric}\n  Feedback:\n")
    judge = Judge(MockBackend(), ScorerConfig(template=str(t)))
    before = fp_of(req(), judge)
    t.write_text("body: |\n  Question: {instruction}\n  Answer: {response}\n  {rubric}\n  Feedback:\n")
    assert fp_of(req(), judge) != before  # same template name, new text: judged anew
    base = fp_of(req())
    monkeypatch.setattr("vlm_judge.__version__", "0.1.99")  # a patch release keeps every judgment
    monkeypatch.setattr(store_mod, "__version__", "0.1.99", raising=False)
    assert fp_of(req()) == base
    monkeypatch.setattr(store_mod, "PROMPT_FORMAT_VERSION", store_mod.PROMPT_FORMAT_VERSION + 1)
    assert fp_of(req()) != base


def test_errors_are_never_final_and_the_latest_judgment_wins(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [
        line("a", "ok", "fa"), line("b", "error", "fb"), line("c", "parse_failure", "fc"), line("d", "ok", "old-d"),
        line("d", "ok", "fd", score=5)]))
    with JudgmentStore(path) as s:
        assert s.reusable("a", "fa")["score"] == 3
        assert s.reusable("b", "fb") is None  # an error: retried
        assert s.reusable("c", "fc")["status"] == "parse_failure"  # a parse failure is a judgment
        assert s.reusable("a", "changed") is None  # the row or a setting changed
        assert s.reusable("d", "fd")["score"] == 5 and s.reusable("d", "old-d") is None


def test_torn_tail_is_cut_and_compaction_keeps_input_order(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(line("b")) + "\n" + json.dumps(line("x", fp="fx")) + "\n" + '{"id": "a", "sta')
    with JudgmentStore(path) as s:
        assert s.reusable("b", "f") is not None and s.bad_lines == 1
        s.add([line("a", "error"), line("c")])
        s.add([line("a", "ok", score=4)])
        final = s.compact(["a", "b", "c"])
    assert [r["id"] for r in final] == ["a", "b", "c"] and final[0]["score"] == 4
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "x"]  # rows of another input are kept, after ours
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_an_appended_line_never_glues_onto_a_torn_one(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(line("a")) + "\n" + '{"id": "b", "sc')
    with JudgmentStore(path) as s:
        s.add([line("b")])
    with JudgmentStore(path) as s:
        assert s.reusable("a", "f") and s.reusable("b", "f") and s.bad_lines == 0


def test_a_second_store_on_the_same_output_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    with JudgmentStore(path, what="score run"):
        with pytest.raises(Locked, match="another score run is writing to"):
            JudgmentStore(path, what="score run").__enter__()
    with JudgmentStore(path):  # released when the first closed
        pass


def test_keyed_by_fingerprint_a_cache_holds_several_settings(tmp_path):
    path = tmp_path / "cache.jsonl"
    with JudgmentStore(path, key=FINGERPRINT) as s:
        s.add([line("a", "ok", "f1"), line("a", "ok", "f2", score=1), line("a", "error", "f3")])
        assert s.reusable("a", "f1")["score"] == 3 and s.reusable("a", "f2")["score"] == 1
        assert s.reusable("a", "f3") is None
        s.add([replace_status(line("a", "error", "f1"))])  # an error never replaces a judgment
        assert s.reusable("a", "f1")["score"] == 3
        s.compact()
    assert [json.loads(x)[FINGERPRINT] for x in path.read_text().splitlines()] == ["f1", "f2", "f3"]


def replace_status(d: dict) -> dict:
    return {**d, "reason": "HTTP 500"}

