"""`vlm-judge score` end to end: real image files (one corrupt), a row missing a field, a killed
run, and re-runs that resume without duplicates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.samples import PROMETHEUS_VISION
from vlm_judge.backends import register_backend
from vlm_judge.backends.mock import MockBackend
from vlm_judge.cli import main as vlm_main

RUBRIC = {"criteria": "Does the answer name what is in the photo?",
          **{f"score{i}_description": f"level {i}" for i in range(1, 6)}}
CALLS: list[str] = []


class CountingBackend(MockBackend):
    """The mock, recording which rows reach the model; a row whose text says UNPARSABLE gets no verdict."""

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        for p, g in zip(prompts, out):
            CALLS.append(p.user.split("###The instruction to evaluate:\n")[1].split("\n")[0])
            if "UNPARSABLE" in p.user:
                g.text = "Feedback: I cannot decide."
        return out


register_backend("counting", f"{__name__}:CountingBackend")


@pytest.fixture
def data(tmp_path, sample_images) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        shutil.copy(sample_images[name], photos / f"{name}.png")
    (photos / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 cut off")
    rows = [
        {"id": "astro", "instruction": "Who is this?", "response": "An astronaut.", "rubric": RUBRIC,
         "image": "photos/astronaut.png"},
        {"id": "cat", "instruction": "What animal?", "response": "A cat.", "rubric": RUBRIC,
         "images": ["photos/chelsea.png", "photos/coffee.png"]},
        {"id": "broken", "instruction": "What is it?", "response": "A cup.", "rubric": RUBRIC, "image": "photos/corrupt.png"},
        {"id": "noresp", "instruction": "What is it?", "rubric": RUBRIC, "image": "photos/coffee.png"},
        {"instruction": "Which answer is better?", "response": "A cup of coffee.", "response_b": "A cat.",
         "rubric": {"criteria": "Which names the drink?"}, "image": "photos/coffee.png"},
        {"id": "text", "instruction": "UNPARSABLE Say hi.", "response": "Hi.", "rubric": RUBRIC},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def score(*args: str) -> int:
    return vlm_main(["score", *args, "--no-progress"])


def test_score_mixed_rows_then_resume_without_duplicates(data, capsys):
    out = data.parent / "out" / "judged.jsonl"
    CALLS.clear()
    rc = score(str(data), "--judge", "mock", "--backend", "counting", "--out", str(out), "--chunk-size", "2")
    assert rc == 3  # some rows errored; the others were judged
    rows = lines(out)
    assert [r["id"] for r in rows] == ["astro", "cat", "broken", "noresp", "4", "text"]  # input order
    by = {r["id"]: r for r in rows}
    assert by["astro"]["status"] == "ok" and by["astro"]["score"] in (1, 2, 3, 4, 5)
    assert by["cat"]["status"] == "ok"
    assert by["4"]["mode"] == "relative" and by["4"]["score"] in ("A", "B", "tie")
    assert by["broken"]["status"] == "error" and "cannot decode image" in by["broken"]["reason"]
    assert by["broken"]["reason"].startswith("field 'image'")
    assert by["noresp"]["status"] == "error" and by["noresp"]["reason"] == "field 'response': missing or empty"
    assert by["text"]["status"] == "parse_failure" and by["text"]["attempts"] == 3  # 2 retries by default
    assert all(r["judge"] == "mock" and r["template"] == "default" for r in rows)
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert (summary["rows"], summary["scored"], summary["parse_failures"], summary["errors"]) == (6, 3, 1, 2)
    assert summary["failure_reasons"] == {"no score found": 1}
    printed = capsys.readouterr().out
    assert "scored: 3" in printed and "missing or empty" in printed and "no score found" in printed
    first_calls = len(CALLS)
    assert first_calls == 1 + 1 + 2 + 3  # astro, cat, both orders of row 4, three tries of 'text'

    # fix the corrupt image and the missing field; re-run: only the two error rows are judged
    shutil.copy(data.parent / "photos" / "astronaut.png", data.parent / "photos" / "corrupt.png")
    fixed = [json.loads(x) for x in data.read_text().splitlines()]
    fixed[3]["response"] = "A coffee cup."
    data.write_text("".join(json.dumps(r) + "\n" for r in fixed))
    CALLS.clear()
    rc = score(str(data), "--judge", "mock", "--backend", "counting", "--out", str(out))
    assert rc == 0
    assert sorted(CALLS) == ["What is it?", "What is it?"]
    rows2 = lines(out)
    assert [r["id"] for r in rows2] == [r["id"] for r in rows]  # no duplicates, same order
    assert all(r["status"] in ("ok", "parse_failure") for r in rows2)
    kept = {r["id"]: r for r in rows2}
    assert kept["astro"] == by["astro"] and kept["text"] == by["text"]  # untouched
    assert "resumed: 4 rows" in capsys.readouterr().out

    # a third run has nothing left to judge
    CALLS.clear()
    assert score(str(data), "--judge", "mock", "--backend", "counting", "--out", str(out)) == 0
    assert CALLS == [] and lines(out) == rows2


def test_a_killed_run_resumes_from_its_partial_file(data):
    out = data.parent / "judged.jsonl"
    assert score(str(data), "--judge", "mock", "--backend", "counting", "--out", str(out)) == 3
    full = lines(out)
    # as if killed mid-write: the first two rows saved, the third torn
    out.write_text("\n".join(json.dumps(r) for r in full[:2]) + '\n{"id": "broken", "mod')
    CALLS.clear()
    assert score(str(data), "--judge", "mock", "--backend", "counting", "--out", str(out)) == 3
    again = lines(out)
    assert [r["id"] for r in again] == [r["id"] for r in full]
    assert [(r["id"], r["score"], r["status"]) for r in again] == [(r["id"], r["score"], r["status"]) for r in full]
    assert "Who is this?" not in CALLS and "What animal?" not in CALLS  # saved rows were not redone


def test_published_rows_through_the_cli_with_an_image_rewrite(tmp_path, sample_images):
    src = PROMETHEUS_VISION
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(src / "sample_eval_data.jsonl", data / "eval.jsonl")
    imgs = tmp_path / "my_images"
    (imgs / "mmmu").mkdir(parents=True)
    for name in ("9900", "3215"):
        shutil.copy(sample_images["coffee"], imgs / "mmmu" / f"{name}.png")
    out = tmp_path / "out.jsonl"
    rc = score(str(data / "eval.jsonl"), "--judge", "mock", "--out", str(out), "--image-rewrite", f"../mmmu/={imgs}/mmmu/")
    rows = lines(out)
    assert rc == 3 and [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert "outside the allowed folders" in rows[2]["reason"] and "train2017" in rows[2]["reason"]


def test_column_map_rubric_file_and_config_errors(tmp_path, capsys):
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "What is 3+3?", "a": "6"}]
    (tmp_path / "in.json").write_text(json.dumps(rows))
    (tmp_path / "rubric.json").write_text(json.dumps(RUBRIC))
    out = tmp_path / "o.jsonl"
    args = [str(tmp_path / "in.json"), "--judge", "mock", "--out", str(out)]
    assert score(*args, "--column-map", "instruction=q,response=a", "--rubric", str(tmp_path / "rubric.json"),
                 "--template", "prefix") == 0
    assert [r["template"] for r in lines(out)] == ["prefix", "prefix"]
    capsys.readouterr()
    assert score(*args) == 2  # the same --out with another template: refused, not mixed
    assert "holds judgments by judge 'mock' with template 'prefix'" in capsys.readouterr().err
    args[-1] = str(tmp_path / "o2.jsonl")
    assert score(*args, "--column-map", "instruction=q,response=a") == 1  # no rubric anywhere: nothing judged
    assert [r["reason"] for r in lines(tmp_path / "o2.jsonl")] == ["field 'rubric': missing (and no default rubric was given)"] * 2
    assert score(*args, "--template", str(tmp_path / "nope.yaml")) == 2
    assert "unknown template" in capsys.readouterr().err
    assert score(str(tmp_path / "missing.jsonl"), "--judge", "mock", "--out", str(out)) == 2
    assert score(*args, "--n-samples", "3") == 2
    # a user template file: its name is recorded, and a re-run resumes (nothing new to judge)
    (tmp_path / "mine.yaml").write_text("body: |\n  Q: {instruction}\n  A: {response}\n  {rubric}\n  Feedback:\n")
    mapped = [str(tmp_path / "in.json"), "--judge", "mock", "--out", str(tmp_path / "o3.jsonl"), "--template",
              str(tmp_path / "mine.yaml"), "--column-map", "instruction=q,response=a", "--rubric", str(tmp_path / "rubric.json")]
    assert score(*mapped) == 0 and score(*mapped) == 0
    assert [r["template"] for r in lines(tmp_path / "o3.jsonl")] == ["mine", "mine"]
    assert score(*args, "--image-rewrite", "no-equals-sign") == 2
    assert score(*args, "--backend", "nosuch") == 2
    assert "unknown backend" in capsys.readouterr().err


def test_score_with_a_real_tiny_llava_judge(data, tiny_llava_dir):
    """The same file through the hf backend: pixels reach a real (random) LLaVA; with no verdict
    in its output every readable row is a parse failure with its reason, never a made-up score."""
    pytest.importorskip("transformers")
    out = data.parent / "hf.jsonl"
    rc = score(str(data), "--judge", str(tiny_llava_dir), "--backend", "hf", "--out", str(out),
               "--max-new-tokens", "4", "--retries", "0", "--batch-size", "4")
    rows = {r["id"]: r for r in lines(out)}
    assert rc == 3 and len(rows) == 6
    assert rows["broken"]["status"] == "error" and rows["noresp"]["status"] == "error"
    for rid in ("astro", "cat", "4", "text"):
        r = rows[rid]
        assert r["status"] == "parse_failure" and r["score"] is None and r["reason"], r
    assert rows["4"]["attempts"] == 2  # both orders were generated


def _text_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_an_edited_row_or_a_changed_setting_is_judged_again(tmp_path, sample_images):
    img = tmp_path / "pic.png"
    shutil.copy(sample_images["astronaut"], img)
    rows = [{"id": f"r{k}", "instruction": f"Question {k}?", "response": f"Answer {k}.", "rubric": RUBRIC}
            for k in range(4)]
    rows[3]["image"] = "pic.png"
    data, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    _text_rows(data, rows)
    run = ["--judge", "mock", "--backend", "counting", "--out", str(out)]
    CALLS.clear()
    assert score(str(data), *run) == 0 and sorted(CALLS) == [f"Question {k}?" for k in range(4)]
    first = {r["id"]: r for r in lines(out)}

    rows[0]["response"] = "Another answer."
    rows[1]["rubric"] = {**RUBRIC, "score5_description": "perfect"}
    _text_rows(data, rows)
    shutil.copy(sample_images["chelsea"], img)  # the same path, another picture
    CALLS.clear()
    assert score(str(data), *run) == 0
    assert sorted(CALLS) == ["Question 0?", "Question 1?", "Question 3?"]  # the untouched row is kept
    assert {r["id"]: r for r in lines(out)}["r2"] == first["r2"]
    CALLS.clear()
    assert score(str(data), *run) == 0 and CALLS == []

    for setting in (["--temperature", "0.5"], ["--max-new-tokens", "64"], ["--top-p", "0.5"], ["--retries", "0"]):
        CALLS.clear()
        assert score(str(data), *run, *setting) == 0
        assert sorted(CALLS) == [f"Question {k}?" for k in range(4)], setting
        assert [r["id"] for r in lines(out)] == ["r0", "r1", "r2", "r3"]  # still one line per row


def test_bad_input_lines_are_error_lines_and_the_rest_is_scored(tmp_path, capsys):
    good = [json.dumps({"id": f"g{k}", "instruction": f"Question {k}?", "response": "Yes.", "rubric": RUBRIC}).encode()
            for k in range(3)]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join([
        good[0],
        b'{"id": "latin1", "instruction": "caf\xe9?", "response": "x"}',  # not UTF-8
        b'{"id": "big", "n": ' + b"9" * 5000 + b"}",  # past Python's int digit limit
        good[1],
        b"[1, 2, 3]",  # not an object
        good[2],
        json.dumps({"id": "strbytes", "instruction": "Q?", "response": "A.", "rubric": RUBRIC,
                    "image": {"bytes": "not bytes"}}).encode(),  # a readable line, a bad row
        b'{"id": "torn", "instruction": "cut o',  # a killed writer's last line
    ]))
    out = tmp_path / "out.jsonl"
    run = [str(data), "--judge", "mock", "--backend", "counting", "--out", str(out)]
    for _ in range(2):  # a re-run does not stop at the same line either
        CALLS.clear()
        assert score(*run) == 3
        rows = lines(out)
        by_status: dict[str, list[str]] = {}
        for r in rows:
            by_status.setdefault(r["status"], []).append(r["id"])
        assert by_status["ok"] == ["g0", "g1", "g2"] and len(by_status["error"]) == 5
        reasons = [r["reason"] for r in rows if r["status"] == "error"]
        assert "line 2" in reasons[0] and "UTF-8" in reasons[0]
        assert "line 3" in reasons[1] and "not valid JSON" in reasons[1]
        assert "line 5" in reasons[2] and "not a JSON object" in reasons[2]
        assert "field 'image'" in reasons[3] and "bytes" in reasons[3]
        assert "line 8" in reasons[4] and "no newline" in reasons[4]
    assert CALLS == []  # the good rows were kept from the first run
    assert "Traceback" not in capsys.readouterr().err


SLOW_RUN = """
import sys, time
from pathlib import Path
from vlm_judge.backends import register_backend
from vlm_judge.backends.mock import MockBackend
from vlm_judge.cli import main

class Gated(MockBackend):
    def generate(self, prompts, params):
        Path(sys.argv[1]).touch()  # this run is judging now
        gate = Path(sys.argv[2])
        for _ in range(600):
            if gate.exists():
                break
            time.sleep(0.05)
        return super().generate(prompts, params)

register_backend("gated", __name__ + ":Gated")
sys.exit(main(["score", *sys.argv[3:], "--backend", "gated", "--no-progress"]))
"""


def test_a_second_run_on_the_same_out_is_refused_and_the_first_loses_nothing(tmp_path):
    import os
    import subprocess
    import sys
    import time

    rows = [{"id": f"r{k}", "instruction": f"Question {k}?", "response": "Yes.", "rubric": RUBRIC} for k in range(40)]
    small = tmp_path / "small.jsonl"
    big = tmp_path / "big.jsonl"
    _text_rows(small, rows[:5])
    _text_rows(big, rows)
    out, gate = tmp_path / "out.jsonl", tmp_path / "gate"
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start(inp: Path, marker: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(tmp_path / marker), str(gate), str(inp), "--judge",
                                 "mock", "--out", str(out), "--chunk-size", "4"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(big, "first-judging")
    try:
        deadline = time.time() + 120
        while not (tmp_path / "first-judging").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = start(small, "second-judging")
        # refused at once, or (the defect) judging beside the first: then let both finish and fail below
        while second.poll() is None and not (tmp_path / "second-judging").exists():
            assert time.time() < deadline, "the second run neither ran nor was refused"
            time.sleep(0.05)
        gate.touch()
        second_rc = second.wait(timeout=120)
        _, second_err = second.communicate()
        first_out, first_err = first.communicate(timeout=120)
    finally:
        gate.touch()
        first.kill()
    assert first.returncode == 0, first_err
    assert second_rc != 0, "both runs exited 0"
    assert "another score run is writing to" in second_err and "choose another output" in second_err
    assert [r["id"] for r in lines(out)] == [r["id"] for r in rows]  # every row of the first run
    assert all(r["status"] == "ok" for r in lines(out))


def test_mock_judge_with_a_base_url_is_scored_by_the_server(data, capsys):
    """`--judge mock --base-url URL` goes to the server (the openai backend), not an in-process mock."""
    from vlm_judge.serve import start_server

    CALLS.clear()
    with start_server(CountingBackend("mock"), model_name="mock") as h:
        rc = score(str(data), "--judge", "mock", "--base-url", h.base_url, "--out", str(data.parent / "o.jsonl"),
                   "--backend-arg", "timeout=20", "--backend-arg", "max_retries=0")
    assert rc == 3  # the two bad rows, as in process
    assert len(CALLS) == 1 + 1 + 2 + 3  # every judged row reached the served model
    assert {r["judge"] for r in lines(data.parent / "o.jsonl")} == {"mock"}


def test_score_help_shows_defaults_and_the_shared_judge_options(capsys):
    with pytest.raises(SystemExit):
        score("--help")
    text = capsys.readouterr().out
    assert "judge options" in text and "--backend-arg" in text and "--retries" in text
    assert "(default: 512)" in text and "(default: 2)" in text
    assert "--max-parse-retries" not in text  # the old eval spelling: accepted, not shown
