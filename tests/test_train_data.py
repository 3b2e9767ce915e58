"""Training data: published Prometheus-Vision rows, our exports, pairwise swap, reference dropout, bad rows."""

from __future__ import annotations

import json

import pytest

from tests.samples import PROMETHEUS_VISION
from train.data import (
    RowContext,
    RowError,
    augment,
    load_examples,
    split_heldout,
    split_prompt,
    swap_ab_text,
)
from train.debug_data import rows_for, write_jsonl
from vlm_judge.parse import parse_output
from vlm_judge.prompts import render

SAMPLES = PROMETHEUS_VISION


def test_published_llava_conversation_rows(sample_images):
    raw = json.loads((SAMPLES / "sample_train_data.json").read_text())
    # the published rows point at ../mmmu/361.png: a prefix rewrite points them at a real photo
    ctx = RowContext(image_rewrites={"../mmmu/361.png": str(sample_images["astronaut"])},
                     allowed_image_dirs=[str(sample_images["astronaut"].parent)])
    exs, rep = load_examples([SAMPLES / "sample_train_data.json"], ctx)
    assert rep.examples == 3 and not rep.skipped
    assert [e.verdict for e in exs] == [1, 2, 3]
    e = exs[0]
    human = raw[0]["conversations"][0]["value"]
    # the parts were recovered from the rendered prompt ...
    assert e.request.instruction.startswith("Analyze the financial data in the image")
    assert e.request.instruction in human and e.request.response.strip() in human
    assert e.request.reference_answer and e.request.reference_answer in human
    assert e.request.rubric.complete and e.request.rubric.score_descriptions[0].startswith("Does not recognize")
    # ... and re-rendered by our renderer; the target is the published feedback in our target form
    assert "###Response to evaluate:" in render(e.request).user
    gpt = raw[0]["conversations"][1]["value"]
    assert e.target.endswith("So the overall score is 1.\n[RESULT] 1")
    assert parse_output(e.target, "absolute").feedback == parse_output(gpt, "absolute").feedback
    assert e.request.images[0].path == str(sample_images["astronaut"].resolve())


def test_published_paths_that_climb_out_are_refused_by_default():
    exs, rep = load_examples([SAMPLES / "sample_train_data.json"], RowContext())
    assert not exs and rep.skipped["unreadable image"] == 3
    assert "outside the allowed folders" in rep.first_errors[0]


def test_published_eval_rows_have_no_gold_score():
    # eval rows name the response `original_response` and carry no score: not training rows
    exs, rep = load_examples([SAMPLES / "sample_eval_data.jsonl"], RowContext(check_images=False, allowed_image_dirs=["/"]))
    assert not exs and rep.skipped == {"missing field": 3}
    assert all("orig_score" in e for e in rep.first_errors)


def test_original_response_alias_and_feedback_from_output(tmp_path, sample_images):
    row = {"image": str(sample_images["coffee"]), "orig_instruction": "What is this?", "original_response": "Coffee.",
           "orig_criteria": "Is it right?", **{f"orig_score{i}_description": f"d{i}" for i in range(1, 6)},
           "output": "Feedback: Names the coffee. So the overall score is 4.\n[RESULT] 4"}
    exs, rep = load_examples([write_jsonl([row], tmp_path / "r.jsonl")], RowContext(allowed_image_dirs=[str(sample_images["coffee"].parent)]))
    assert rep.examples == 1
    assert exs[0].request.response == "Coffee." and exs[0].verdict == 4
    assert exs[0].target == "Names the coffee. So the overall score is 4.\n[RESULT] 4"


def test_parquet_with_image_bytes(tmp_path, sample_images):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    absolute, _ = rows_for({"chelsea": "x"})
    rows = [{**r, "image": {"bytes": sample_images["chelsea"].read_bytes(), "path": None}} for r in absolute]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet")
    exs, rep = load_examples([tmp_path / "pc.parquet"], RowContext())
    assert rep.examples == 4 and exs[0].request.images[0].data == sample_images["chelsea"].read_bytes()


def test_pairwise_rows_with_position_swap(tmp_path):
    _, pairs = rows_for({"rocket": "x"})
    rows = [{k: v for k, v in pairs[0].items() if k != "image"}]
    exs, _ = load_examples([write_jsonl(rows, tmp_path / "p.jsonl")], RowContext(kind="text"))
    assert len(exs) == 1 and exs[0].verdict == "B"
    both = augment(exs, swap=True, reference_dropout=0.0, seed=0)
    assert len(both) == 2
    orig, sw = both
    assert sw.request.response == orig.request.response_b and sw.request.response_b == orig.request.response
    assert sw.verdict == "A" and sw.augmented == "swap"
    assert parse_output(sw.target, "relative").verdict == "A"
    # the feedback's mentions of the two responses follow the swap
    assert "Response A names a rocket on a launch pad correctly, while Response B names" in sw.target
    assert augment(exs, swap=False, reference_dropout=0.0, seed=0) == exs


def test_swap_text_exchanges_mentions_only():
    assert swap_ab_text("Response A is vague; response B is exact. A is worse.") == "Response B is vague; response A is exact. B is worse."
    assert swap_ab_text("A cat sits. The answer is B-grade.") == "A cat sits. The answer is B-grade."


def test_reference_dropout_is_seeded_and_partial(tmp_path):
    absolute, _ = rows_for({f"img{i}": "x" for i in range(10)})
    rows = [{k: v for k, v in r.items() if k != "image"} for r in absolute]
    exs, _ = load_examples([write_jsonl(rows, tmp_path / "a.jsonl")], RowContext(kind="text"))
    a = augment(exs, swap=False, reference_dropout=0.5, seed=3)
    b = augment(exs, swap=False, reference_dropout=0.5, seed=3)
    dropped = [e for e in a if e.request.reference_answer is None]
    assert a == b and 5 <= len(dropped) <= 35 and all(e.augmented == "noref" for e in dropped)
    assert "###Reference Answer" not in render(dropped[0].request).user


def test_bad_rows_counted_or_fail(tmp_path, sample_images):
    absolute, _ = rows_for({"coffee": str(sample_images["coffee"])})
    rows = [
        absolute[0],
        {**absolute[1], "orig_score": 9},
        {**absolute[2], "orig_feedback": ""},
        {**absolute[3], "image": str(tmp_path / "nope.png")},
        {k: v for k, v in absolute[0].items() if k != "orig_score3_description"},
    ]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    rows.append({**absolute[0], "image": str(tmp_path / "corrupt.png")})
    path = write_jsonl(rows, tmp_path / "bad.jsonl")
    with path.open("a") as f:
        f.write("{not json\n")
    ctx = RowContext(allowed_image_dirs=[str(sample_images["coffee"].parent), str(tmp_path)])
    exs, rep = load_examples([path], ctx)
    assert rep.rows == 7 and rep.examples == 1
    assert rep.skipped == {"missing field": 3, "unreadable image": 2, "bad json": 1}
    assert any("bad.jsonl:4: missing field: orig_score3_description" in e for e in rep.first_errors)
    with pytest.raises(RowError, match=r"bad.jsonl:1: missing field: orig_score"):
        load_examples([path], ctx, on_bad_row="fail")


def test_text_judge_refuses_image_rows(tmp_path, sample_images):
    absolute, _ = rows_for({"coffee": str(sample_images["coffee"])})
    ctx = RowContext(kind="text", allowed_image_dirs=[str(sample_images["coffee"].parent)])
    exs, rep = load_examples([write_jsonl(absolute, tmp_path / "a.jsonl")], ctx)
    assert not exs and rep.skipped == {"image row": 4}


def test_heldout_split_keeps_an_instruction_on_one_side(tmp_path):
    absolute, _ = rows_for({f"img{i}": "x" for i in range(20)})
    rows = [{**{k: v for k, v in r.items() if k != "image"}, "orig_instruction": f"Q{r['id'].split('-')[0]}"} for r in absolute]
    exs, _ = load_examples([write_jsonl(rows, tmp_path / "a.jsonl")], RowContext(kind="text"))
    train, held = split_heldout(exs, 0.25, seed=0)
    assert train and held and len(train) + len(held) == len(exs)
    assert not {e.request.instruction for e in train} & {e.request.instruction for e in held}


def test_split_prompt_relative():
    text = ("<image>\n###Task Description:\nx\n\n###The instruction to evaluate:\nQ?\n\n###Response A:\nfoo\n\n"
            "###Response B:\nbar\n\n###Reference Answer:\nref\n\n###Score Rubric:\nIs it right?\n\n###Feedback: ")
    parts = split_prompt(text)
    assert parts == {"mode": "relative", "instruction": "Q?", "response_a": "foo", "response_b": "bar",
                     "reference_answer": "ref", "rubric": "Is it right?"}


def test_eval_metrics_through_the_scorer(tmp_path):
    """Parse rate, Pearson, exact agreement and pair accuracy, with scripted judge outputs."""
    from train.evaluate import evaluate, pearson
    from vlm_judge.backends.mock import MockBackend

    absolute, pairs = rows_for({"a": "x", "b": "y"})
    rows = [{k: v for k, v in r.items() if k != "image"} for r in absolute + pairs]
    exs, _ = load_examples([write_jsonl(rows, tmp_path / "h.jsonl")], RowContext(kind="text"))
    gold = {ex.request.response: ex.verdict for ex in exs if ex.request.mode == "absolute"}

    def script(prompt, _n):
        if "###Response A:" in prompt.user:
            return "Feedback: B names it. [RESULT] B"
        resp = prompt.user.split("###Response to evaluate:\n")[1].split("\n\n")[0]
        if resp == "I do not know.":
            return "no verdict here"
        return f"Feedback: ok. So the overall score is {gold[resp]}.\n[RESULT] {gold[resp]}"

    m = evaluate(None, None, exs, backend=MockBackend(model="scripted", script=script))
    assert m["eval/n"] == len(exs) == 10
    assert m["eval/parse_rate"] == pytest.approx(8 / 10)  # two 'I do not know.' rows do not parse
    assert m["eval/pearson"] == pytest.approx(1.0) and m["eval/exact"] == 1.0
    assert m["eval/pair_accuracy"] == 1.0
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_one_row_error_and_bad_lines_do_not_stop_the_reader(tmp_path, sample_images):
    import vlm_judge.inputs

    assert RowError is vlm_judge.inputs.RowError
    absolute, _ = rows_for({"coffee": str(sample_images["coffee"])})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(absolute[0]).encode() + b"\n\xff\xfe\n[1, 2]\n" + json.dumps(absolute[1]).encode() + b"\n")
    exs, rep = load_examples([path], RowContext(allowed_image_dirs=[str(sample_images["coffee"].parent)]))
    assert rep.rows == 4 and rep.examples == 2 and rep.skipped == {"bad json": 2}
    assert any("rows.jsonl:1" in e and "line 2" in e and "UTF-8" in e for e in rep.first_errors), rep.first_errors
    assert any("rows.jsonl:2" in e and "line 3" in e and "not a JSON object" in e for e in rep.first_errors)


def test_training_rows_from_csv(tmp_path):
    import csv

    absolute, _ = rows_for({"coffee": "x"})
    rows = [{k: v for k, v in r.items() if k != "image"} for r in absolute]
    with (tmp_path / "rows.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    exs, rep = load_examples([tmp_path / "rows.csv"], RowContext(kind="text"))
    assert rep.examples == 4 and [e.verdict for e in exs] == [5, 3, 2, 1]
