"""End to end: `build()` over real photos with the teacher behind the real OpenAI-compatible server
(`vlm_judge.serve.start_server`) serving a scripted model (tests/pc_script.py). Checks the exports,
the summary's numbers, each failure path (corrupt image, malformed teacher output, an HTTP 500 for
one item, near-duplicate rubrics, unfixable length ratio), re-runs that cost nothing, and a run
killed mid-stage that resumes without duplicates or repeated calls."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from perception_collection.config import BuildConfig
from perception_collection.pipeline import build
from perception_collection.rows import SCORES
from perception_collection.store import read_jsonl
from perception_collection.teacher import make_teacher
from tests.fault_server import Fault, start_server
from tests.pc_script import ScriptedVLM, stage_of

# image -> context words that switch on the scripted model's failure paths
CONTEXTS = {
    "astronaut.png": "An astronaut. DUPLICATE",   # 2 rubrics, same criteria: 1 dropped
    "chelsea.png": "A ginger cat.",
    "coffee.png": "A cup of coffee. LONGWINDED",  # responses fit only on the retry with a length hint
    "rocket.png": "A rocket. RAMBLE",             # responses never fit: 4 instructions dropped
    "camera.png": "A photographer. MALFORMED",    # rubric output is prose: image dropped
    "moon.png": "The moon. FAULT500",             # every instructions request gets HTTP 500
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    for name in CONTEXTS:
        Image.fromarray(getattr(data, name[:-4])()).resize((64, 64)).save(d / name)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": k, "context": v}) + "\n"
                                              for k, v in CONTEXTS.items()))
    return d


def _fault(n: int, body: dict):
    parts = body["messages"][-1]["content"]
    text = "\n".join(p.get("text", "") for p in parts) if isinstance(parts, list) else parts
    if "FAULT500" in text and stage_of(text) == "instructions":
        return Fault(500, message="teacher replica crashed")
    return None


@pytest.fixture(scope="module")
def server():
    model = ScriptedVLM()
    with start_server(model, faults=_fault) as srv:
        srv.model = model
        yield srv


def _cfg(photos, server, out, **kw) -> BuildConfig:
    d = {
        "source": {"kind": "folder", "path": str(photos)},
        "counts": {"rubrics_per_image": 2, "instructions_per_rubric": 2},
        "teacher": {"kind": "openai", "model": "scripted-vlm", "base_url": server.base_url, "concurrency": 4,
                    "max_retries": 1, "backend_args": {"backoff": 0.01}},
        "export": ["jsonl", "feedback_collection", "pairwise"],
        "out": str(out),
    }
    d.update(kw)
    return BuildConfig.from_dict(d)


def _ok_requests(server) -> int:
    return list(server.stats.statuses).count(200)


@pytest.fixture(scope="module")
def clean_run(photos, server, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    ok0, req0 = _ok_requests(server), server.stats.requests
    summary = build(_cfg(photos, server, out), progress=False)
    return summary, out, _ok_requests(server) - ok0, server.stats.requests - req0


def test_full_build_counts_drops_and_exports(clean_run):
    s, out, ok, requests = clean_run
    # 6 photos + 1 corrupt; astronaut 1 rubric (dup), camera 0 (malformed), 4 others x 2 = 9 rubrics
    assert s.counts["images"] == 6
    assert s.counts["rubrics"] == 9
    assert s.counts["instructions"] == 14  # moon's 2 rubrics got HTTP 500: 7 rubrics x 2
    assert s.counts["responses"] == 50     # rocket's 4 instructions never length-matched: 10 x 5
    assert s.counts["examples"] == 50 and s.counts["kept"] == 50
    assert s.score_histogram == {s_: 10 for s_ in SCORES}
    assert set(s.words_by_score) == set(SCORES) and max(s.words_by_score.values()) <= 1.2 * min(s.words_by_score.values())
    drops = s.drops
    # the table groups reasons that differ only in paths, request numbers and measured ratios
    assert list(drops["source"].values()) == [1] and next(iter(drops["source"])).startswith("cannot decode image <path>")
    assert drops["rubrics"] == {"near-duplicate rubric dropped": 1, "no JSON object in teacher output": 1}
    assert drops["instructions"] == {"teacher call failed: HTTP 500 after 1 retry: teacher replica crashed": 2}
    assert drops["responses"] == {"length ratio 3.67 over 2 after 3 tries (max/min words of the five responses)": 4}
    # each reason is in the drops file, by id
    rows = {(d["stage"], d["id"]): d["reason"] for d in read_jsonl(out / "drops.jsonl")}
    assert "cannot decode" in rows[("source", "folder-corrupt.jpg")]
    assert "near-duplicate rubric" in rows[("rubrics", "folder-astronaut.png")]
    assert "no JSON object" in rows[("rubrics", "folder-camera.png")]
    assert "teacher replica crashed" in rows[("instructions", "folder-moon.png/r0")]
    assert "length ratio" in rows[("responses", "folder-rocket.png/r1/i0")]
    # teacher cost: rubrics 6 + 1 parse retry, 9 rewordings, 9 instruction calls (2 failed),
    # responses: 6 fit at once, coffee's 4 twice, rocket's 4 three times = 26
    t = s.teacher
    assert (t["calls"], t["errors"], t["parse_failures"], t["cache_hits"]) == (51, 2, 2, 0)
    assert ok == 49 and requests == 53  # the 2 failed calls were each tried twice over HTTP
    assert t["prompt_tokens"] > 0 and t["completion_tokens"] > 0
    # exports: Perception Collection rows with images copied beside them, one per kept example
    pc = read_jsonl(s.exports["jsonl"])
    assert len(pc) == 50 and len({r["id"] for r in pc}) == 50
    assert all((Path(s.exports["jsonl"]).parent / r["image"]).is_file() for r in pc)
    assert {r["orig_score"] for r in pc} == {"1", "2", "3", "4", "5"}
    assert len(read_jsonl(s.exports["feedback_collection"])) == 50 and read_jsonl(s.exports["pairwise"])
    # the run folder documents itself
    assert (out / "recipe.yaml").is_file() and json.loads((out / "version.json").read_text())["vlm_judge"]
    assert json.loads((out / "summary.json").read_text())["counts"]["kept"] == 50
    assert "teacher: 51 calls" in s.format_table()


def test_rerun_makes_no_new_successful_call_and_changes_nothing(clean_run, photos, server):
    s1, out, _, _ = clean_run
    before = read_jsonl(s1.exports["jsonl"])
    ok0 = _ok_requests(server)
    s2 = build(_cfg(photos, server, out), progress=False)
    assert _ok_requests(server) == ok0  # everything came from files and the cache
    assert s2.resumed == {"rubrics": 5, "instructions": 7, "responses": 10}
    # what failed before is retried: moon's calls fail again (errors are not cached); camera's
    # malformed output (2 tries) and rocket's 4 x 3 unmatched tries come from the cache, for free
    assert s2.teacher["calls"] == 2 and s2.teacher["errors"] == 2 and s2.teacher["cache_hits"] == 2 + 12
    assert s2.counts == s1.counts
    assert s2.drops == s1.drops  # drops of resumed items (the duplicate rubric) are still reported
    assert read_jsonl(s2.exports["jsonl"]) == before
    for name in ("rubrics", "instructions", "responses"):
        ids = [r.get("response_id") or r.get("instruction_id") or r.get("rubric_id") for r in read_jsonl(out / f"{name}.jsonl")]
        assert len(ids) == len(set(ids))


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it as an item error)."""


class KillAfter:
    """Delegates to a teacher, and 'kills the run' at its n+1-th responses call."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.count, self.lock = inner, n, 0, threading.Lock()
        self.name = inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def responses(self, image, rubric, instruction, reference_answer, scores=SCORES, *, length_hint=None, draw=0):
        with self.lock:
            self.count += 1
            if self.count > self.n:
                raise Killed()
        return self.inner.responses(image, rubric, instruction, reference_answer, scores, length_hint=length_hint, draw=draw)


def test_killed_run_resumes_without_duplicates_or_repeated_calls(clean_run, photos, server, tmp_path):
    s_clean, _, ok_clean, _ = clean_run
    cfg = _cfg(photos, server, tmp_path / "run")
    teacher = make_teacher(cfg, tmp_path / "run")
    ok0 = _ok_requests(server)
    with pytest.raises(Killed):
        build(cfg, progress=False, teacher=KillAfter(teacher, 12))
    teacher.close()
    ok_killed = _ok_requests(server) - ok0
    partial = read_jsonl(tmp_path / "run" / "responses.jsonl")
    assert 0 < len(partial) < 50 and not (tmp_path / "run" / "summary.json").exists()
    # what a hard kill can leave behind: a half-written group and a torn line
    pending = next(r for r in read_jsonl(tmp_path / "run" / "instructions.jsonl")
                   if r["instruction_id"] not in {p["instruction_id"] for p in partial} and "rocket" not in r["image_id"])
    with (tmp_path / "run" / "responses.jsonl").open("a") as f:
        f.write(json.dumps({"response_id": pending["instruction_id"] + "/s1", "instruction_id": pending["instruction_id"],
                            "score": 1, "response": "half", "feedback": "half", "_of": 5}) + "\n")
        f.write('{"response_id": "torn')

    ok1 = _ok_requests(server)
    s = build(cfg, progress=False)
    ok_resumed = _ok_requests(server) - ok1
    assert ok_killed + ok_resumed == ok_clean  # no successful call was made twice
    assert s.counts == s_clean.counts and s.score_histogram == s_clean.score_histogram
    rows = read_jsonl(tmp_path / "run" / "responses.jsonl")
    ids = [r["response_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 50
    assert all(r["response"] != "half" for r in rows)
    assert sorted(r["id"] for r in read_jsonl(s.exports["jsonl"])) == sorted(r["id"] for r in read_jsonl(s_clean.exports["jsonl"]))


def test_hard_killed_process_resumes(photos, tmp_path):
    """SIGKILL a real `vlm-judge data build` process mid-responses, then resume: a complete, duplicate-free
    result, and at most the calls that were in flight at the kill are made twice."""
    import os
    import subprocess
    import sys
    import time


    model = ScriptedVLM()

    def slow_responses(n, body):
        parts = body["messages"][-1]["content"]
        text = "\n".join(p.get("text", "") for p in parts) if isinstance(parts, list) else parts
        if "FAULT500" in text and stage_of(text) == "instructions":
            return Fault(500, message="teacher replica crashed")
        return Fault(status=None, delay=0.1) if stage_of(text) == "responses" else None

    with start_server(model, faults=slow_responses) as srv:
        cfg = _cfg(photos, srv, tmp_path / "run", teacher={
            "kind": "openai", "model": "scripted-vlm", "base_url": srv.base_url, "concurrency": 2,
            "max_retries": 1, "backend_args": {"backoff": 0.01}})
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(cfg.to_yaml())
        repo = Path(__file__).resolve().parents[1]
        proc = subprocess.Popen([sys.executable, "-m", "perception_collection.cli", "build", str(recipe), "--no-progress"],
                                cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        responses = tmp_path / "run" / "responses.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if responses.is_file() and len(responses.read_text().splitlines()) >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.kill()
        proc.wait()
        ok_killed = _ok_requests(srv)
        n_partial = len(read_jsonl(responses))
        assert 10 <= n_partial < 50

        s = build(cfg, progress=False)
        ok_resumed = _ok_requests(srv) - ok_killed
        cfg_clean = _cfg(photos, srv, tmp_path / "clean", teacher=cfg.to_dict()["teacher"])
        build(cfg_clean, progress=False)
        ok_clean = _ok_requests(srv) - ok_killed - ok_resumed
    ids = [r["response_id"] for r in read_jsonl(responses)]
    assert len(ids) == len(set(ids)) == 50 and s.counts["kept"] == 50
    assert ok_clean <= ok_killed + ok_resumed <= ok_clean + cfg.teacher.concurrency


def test_noisy_stage_added_to_a_finished_run_costs_only_its_own_calls(clean_run, photos, server, tmp_path):
    import shutil

    _, out, _, _ = clean_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    model_calls = dict(server.model.calls)
    s = build(_cfg(photos, server, run, noisy=True), progress=False)
    new = {k: v - model_calls.get(k, 0) for k, v in server.model.calls.items() if v != model_calls.get(k, 0)}
    # one pair per kept instruction (10): a noisy instruction and two answers each; moon's 2 failing
    # instruction calls are retried (they never reach the model)
    assert new == {"noisy": 10, "answer": 20}
    assert s.noisy_pairs == 10
    pairs = read_jsonl(s.exports["pairwise"])
    noisy = [p for p in pairs if p.get("pair_source") == "noisy_instruction"]
    assert len(noisy) == 10 and all((Path(s.exports["pairwise"]).parent / p["image"]).is_file() for p in noisy)
    assert len(read_jsonl(run / "noisy.jsonl")) == 10


def test_mmmu_build_keeps_the_answer_out_of_the_text_only_export(server, tmp_path, sample_images):
    import datasets

    rows = {"id": ["validation_Art_1", "validation_Art_2"],
            "question": ["Which animal is in <image 1>?", "What is the person in <image 1> wearing?"],
            "options": ["['dog', 'cat']", "['a space suit', 'a raincoat']"], "answer": ["B", "A"],
            "image_1": [{"bytes": sample_images["chelsea"].read_bytes(), "path": None},
                        {"bytes": sample_images["astronaut"].read_bytes(), "path": None}]}
    feats = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                               "options": datasets.Value("string"), "answer": datasets.Value("string"),
                               "image_1": datasets.Image()})
    pq = tmp_path / "mmmu.parquet"
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(pq))
    cfg = _cfg(None, server, tmp_path / "run", source={"kind": "mmmu", "path": str(pq)},
               counts={"rubrics_per_image": 1, "instructions_per_rubric": 1, "paraphrase_rubrics": False})
    s = build(cfg, progress=False)
    assert s.counts["images"] == 2 and s.counts["kept"] == 10
    teacher_saw = [json.loads(line) for line in (tmp_path / "run" / "sources.jsonl").read_text().splitlines()]
    assert all("Answer:" in im["context"] for im in teacher_saw)  # the teacher is told the answer
    fc = read_jsonl(s.exports["feedback_collection"])
    assert len(fc) == 10 and all("Answer: " not in r["instruction"] for r in fc)
    assert any("(B) cat" in r["instruction"] for r in fc)


def test_easyvqa_with_the_answer_grounded_teacher(tmp_path):
    """No model at all: easy-vqa's shapes with the teacher that writes from gold answers (runs once
    the modules providing `sources_easyvqa.load_source` and `vqa_teacher.AnswerGroundedTeacher` exist)."""
    pytest.importorskip("easy_vqa")
    import importlib

    vqa = importlib.import_module("perception_collection.vqa_teacher")
    src = importlib.import_module("perception_collection.sources_easyvqa")
    if not hasattr(vqa, "AnswerGroundedTeacher") or not hasattr(src, "load_source"):
        pytest.skip("AnswerGroundedTeacher / sources_easyvqa.load_source not available yet")
    cfg = BuildConfig.from_dict({
        "source": {"kind": "easyvqa", "limit": 4},
        "counts": {"rubrics_per_image": 1, "instructions_per_rubric": 2},
        "teacher": {"kind": "answer_grounded"},
        "export": ["jsonl"],
        "out": str(tmp_path / "run"),
    })
    s = build(cfg, progress=False)
    assert s.counts["images"] == 4 and s.counts["kept"] > 0 and s.teacher == {}
    assert "no model calls" in s.format_table()
    rows = read_jsonl(s.exports["jsonl"])
    assert len(rows) == s.counts["kept"] and all(r["orig_reference_answer"] for r in rows)
    assert len(set(s.score_histogram.values())) == 1  # every score equally often
    again = build(cfg, progress=False)
    assert again.counts == s.counts and again.resumed["responses"] * 5 == s.counts["responses"]
