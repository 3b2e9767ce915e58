"""Exports of graded examples about real photos, read back with the real loaders: the trainer's
(train/data.py), the scorer's input adapters (vlm_judge/inputs.py) and Hugging Face `datasets`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perception_collection.export import FORMATS, clean_feedback, export_all, pairwise_rows, perception_row
from tests.pc_examples import make_group, make_image
from tests.samples import PROMETHEUS_VISION
from train.data import RowContext, load_examples, swap_example
from vlm_judge.inputs import read_requests, split_prompt
from vlm_judge.parse import parse_output
from vlm_judge.prompts import render


@pytest.fixture
def examples(sample_images):
    ims = [make_image(p, image_id=f"folder-{name}.png", context=f"A photo of {name}.") for name, p in sample_images.items()]
    return [ex for im in ims[:3] for ex in make_group(im, instruction=f"Describe the colours in the {im.image_id} photo.")]


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_perception_row_matches_the_published_schema(examples):
    row = perception_row(examples[4])
    published = _jsonl(PROMETHEUS_VISION / "sample_eval_data.jsonl")[0]
    expected = set(published) - {"original_response"} | {"orig_response", "output", "orig_feedback", "orig_score", "id"}
    assert set(row) == expected
    assert row["orig_score"] == "5" and row["image"] == examples[4].image.path
    # `instruction` is the full judge prompt (the vision variant) with the Prometheus sections
    parts = split_prompt(row["instruction"])
    assert parts["instruction"] == row["orig_instruction"]
    assert parts["response"] == row["orig_response"]
    assert parts["reference_answer"] == row["orig_reference_answer"]
    assert row["orig_criteria"] in parts["rubric"] and row["orig_score3_description"] in parts["rubric"]
    assert "An image is given" in row["instruction"] and row["instruction"].endswith("###Feedback: ")
    # `output` is the trainer's target: feedback, then both verdict forms, read back by the parser
    assert row["output"].endswith("So the overall score is 5.\n[RESULT] 5")
    parsed = parse_output(row["output"])
    assert parsed.verdict == 5 and parsed.feedback == row["orig_feedback"]


def test_trailing_verdict_in_feedback_is_not_doubled(examples):
    ex = examples[1]
    from dataclasses import replace

    ex = replace(ex, response=replace(ex.response, feedback=ex.response.feedback + " So the overall score is 2."))
    row = perception_row(ex)
    assert row["output"].count("overall score") == 1
    assert clean_feedback("Good. [RESULT] 4") == "Good."


def test_jsonl_and_parquet_load_in_trainer_and_scorer(examples, tmp_path):
    written = export_all(examples, tmp_path / "out", ["jsonl", "parquet"])
    out = tmp_path / "out"
    rows = _jsonl(written["jsonl"])
    assert len(rows) == 15 and all(r["image"].startswith("images/") for r in rows)
    assert len(list((out / "images").iterdir())) == 3  # one file per image, shared by its 5 rows
    info = json.loads((out / "export_info.json").read_text())
    assert info["formats"]["jsonl"]["rows"] == 15 and info["score_histogram"] == {str(s): 3 for s in range(1, 6)}

    for fmt in ("jsonl", "parquet"):
        exs, report = load_examples([written[fmt]], RowContext())
        assert report.skipped == Counter() and len(exs) == 15, report.summary()
        for ex, row in zip(exs, rows):
            assert ex.target == row["output"]
            assert ex.verdict == int(row["orig_score"])
            assert len(ex.request.images) == 1
            # the trainer renders the same prompt the export wrote
            assert render(ex.request).user == row["instruction"]
        reqs = list(read_requests(written[fmt]))
        assert [rid for rid, _ in reqs] == [r["id"] for r in rows]
        assert all(not isinstance(r, Exception) and r.mode == "absolute" for _, r in reqs)
    # pixels survive: the parquet image bytes decode to the source photo
    _, req = next(iter(read_requests(written["parquet"])))
    got = np.asarray(Image.open(__import__("io").BytesIO(req.images[0].data)).convert("RGB"))
    want = np.asarray(Image.open(examples[0].image.path).convert("RGB"))
    assert np.array_equal(got, want)


def test_parquet_is_a_datasets_image_dataset(examples, tmp_path):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    written = export_all(examples, tmp_path, ["parquet"])
    ds = load_dataset("parquet", data_files=written["parquet"], split="train")
    assert isinstance(ds.features["image"], ImageFeature)
    assert ds[0]["image"].size == (64, 64) and ds[0]["orig_score"] == "1"
    assert len(ds) == 15


def test_feedback_collection_rows_carry_the_caption(examples, tmp_path):
    from dataclasses import replace

    no_caption = [replace(ex, image=replace(ex.image, context="")) for ex in make_group(
        make_image(examples[0].image.path, image_id="uncaptioned", context=""), instruction="Which colours?")]
    written = export_all(examples + no_caption, tmp_path, ["feedback_collection"])
    rows = _jsonl(written["feedback_collection"])
    assert len(rows) == 15 and all("image" not in r for r in rows)
    assert rows[0]["orig_instruction"].startswith("Image description: A photo of astronaut.\n\n")
    assert "An image is given" not in rows[0]["instruction"]  # the text prompt, not the vision one
    assert rows[0]["caption_source"].startswith("source context")
    info = json.loads((tmp_path / "export_info.json").read_text())
    assert len(info["skipped"]["feedback_collection"]) == 5
    assert "no caption" in next(iter(info["skipped"]["feedback_collection"].values()))
    # a source's own caption (no task answers in it) is preferred over the teacher's context
    from dataclasses import replace as rep

    ex = examples[0]
    ex = rep(ex, image=rep(ex.image, context="Question: what is it? Answer: (B)", meta={"caption": "An astronaut."}))
    export_all([ex], tmp_path / "cap", ["feedback_collection"])
    row = _jsonl(tmp_path / "cap" / "feedback_collection.jsonl")[0]
    assert row["caption"] == "An astronaut." and "Answer: (B)" not in row["instruction"]
    exs, report = load_examples([written["feedback_collection"]], RowContext(kind="text"))
    assert len(exs) == 15 and not report.skipped
    assert all(not e.request.images for e in exs)


def test_pairwise_rows_train_and_score(examples, tmp_path):
    written = export_all(examples, tmp_path, ["pairwise"], seed=3)
    rows = _jsonl(written["pairwise"])
    assert len(rows) == 3 * 10  # C(5, 2) pairs of different scores per instruction
    assert {r["orig_preference"] for r in rows} == {"A", "B"}  # the winner's side varies
    for r in rows:
        win, lose = (r["orig_score_A"], r["orig_score_B"]) if r["orig_preference"] == "A" else (r["orig_score_B"], r["orig_score_A"])
        assert int(win) > int(lose)
        assert r["image"].startswith("images/")
    exs, report = load_examples([written["pairwise"]], RowContext())
    assert len(exs) == 30 and not report.skipped, report.summary()
    for ex, r in zip(exs, rows):
        assert ex.request.mode == "relative" and ex.verdict == r["orig_preference"]
        assert ex.target == r["output"] and render(ex.request).user == r["instruction"]
        # the trainer's position swap keeps the feedback true: each description follows its response
        sw = swap_example(ex)
        assert sw.request.response == ex.request.response_b
        said = dict(re.findall(r"Response ([AB]): (.+?)(?= Response [AB]: | So the better|$)", sw.target, re.S))
        orig = dict(re.findall(r"Response ([AB]): (.+?)(?= Response [AB]: |$)", r["orig_feedback"], re.S))
        assert said == {"A": orig["B"], "B": orig["A"]}
    reqs = list(read_requests(written["pairwise"]))
    assert all(not isinstance(q, Exception) and q.mode == "relative" for _, q in reqs)
    # same seed, same sides; 'both' gives every pair in both orders
    again = pairwise_rows(examples, seed=3, image_of={e.image.path: "x" for e in examples})
    assert [r["orig_preference"] for r in again] == [r["orig_preference"] for r in rows]
    both = pairwise_rows(examples, order="both", min_score_gap=2)
    assert len(both) == 3 * 6 * 2 and Counter(r["orig_preference"] for r in both) == {"A": 18, "B": 18}


def test_unknown_format_is_refused(examples, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_all(examples, tmp_path, ["csv"])
    assert set(FORMATS) == {"jsonl", "parquet", "feedback_collection", "pairwise"}


def test_re_export_is_idempotent(examples, tmp_path):
    first = export_all(examples, tmp_path, ["jsonl"])
    text = Path(first["jsonl"]).read_text()
    second = export_all(examples, tmp_path, ["jsonl"])
    assert Path(second["jsonl"]).read_text() == text
    assert len(list((tmp_path / "images").iterdir())) == 3
