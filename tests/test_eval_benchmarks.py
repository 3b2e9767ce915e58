"""Benchmark loaders on small files with real images; bad rows are listed, not dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eval.benchmarks import DEFAULT_RUBRIC, load_benchmark, normalize_preference, parse_column_map
from tests.samples import PROMETHEUS_VISION

SAMPLES = PROMETHEUS_VISION / "sample_eval_data.jsonl"


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def visit_rows(imgs: dict[str, str]) -> list:
    """Absolute VisIT-style rows; 'cat' and 'space' categories; two rows are broken on purpose."""
    return [
        {"id": "v1", "instruction": "What animal is shown?", "image": imgs["chelsea"], "instruction_category": "cat",
         "instruction_conditioned_caption": "A tabby cat lies on a rug.", "reference_output": "A cat.",
         "response": "A cat.", "human_ratings": [5, 5, 4], "model": "m1"},
        {"id": "v2", "instruction": "What is launching?", "image": imgs["rocket"], "instruction_category": "space",
         "instruction_conditioned_caption": "A rocket lifts off.", "response": "A bird.", "human_ratings": [1, 2],
         "model": "m2"},
        {"id": "v3", "instruction": "What is in the cup?", "image": imgs["coffee"], "instruction_category": "cat",
         "instruction_conditioned_caption": "A cup of coffee.", "response": "Coffee.", "human_ratings": 4},
        {"id": "v4", "instruction": "Who is this?", "image": "missing.png", "response": "Someone.",
         "human_ratings": [3]},
        {"id": "v5", "instruction": "Who is this?", "image": imgs["astronaut"], "response": "An astronaut."},
        "{not json",
    ]


def test_visit_absolute_rows_and_listed_failures(tmp_path, sample_images):
    imgs = {k: str(v) for k, v in sample_images.items()}
    b = load_benchmark(_write(tmp_path / "visit.jsonl", visit_rows(imgs)), format="visit")
    assert [it.id for it in b.items] == ["v1", "v2", "v3"]
    v1 = b.items[0]
    assert v1.gold == pytest.approx(14 / 3) and v1.human_scores == [5, 5, 4]
    assert v1.caption == "A tabby cat lies on a rug." and v1.category == "cat" and v1.model == "m1"
    assert v1.request.images[0].path == str(Path(imgs["chelsea"]).resolve())
    assert v1.request.reference_answer == "A cat." and v1.request.rubric == DEFAULT_RUBRIC
    reasons = {s["row"]: s["reason"] for s in b.skipped}
    assert b.rows == 6 and len(b.skipped) == 3
    assert "image file not found" in reasons[4] and "missing gold" in reasons[5] and "bad JSON" in reasons[6]


def test_visit_pairwise_and_column_map(tmp_path, sample_images):
    rows = [
        {"qid": 1, "instruction": "Describe.", "img": str(sample_images["chelsea"]), "A": "A cat.", "B": "A dog.",
         "human_preference": "A", "model_a": "m1", "model_b": "m2"},
        {"qid": 2, "instruction": "Describe.", "img": str(sample_images["rocket"]), "A": "x", "B": "A rocket.",
         "human_preference": "model_b"},
        {"qid": 3, "instruction": "Describe.", "img": str(sample_images["rocket"]), "A": "x", "B": "y",
         "human_preference": "maybe"},
    ]
    b = load_benchmark(_write(tmp_path / "p.jsonl", rows), format="visit", column_map="id=qid,image=img")
    assert [(it.id, it.mode, it.gold) for it in b.items] == [("1", "relative", "A"), ("2", "relative", "B")]
    assert b.items[0].model == "m1" and b.items[0].model_b == "m2"
    assert "unreadable preference" in b.skipped[0]["reason"]
    with pytest.raises(ValueError, match="unknown field"):
        load_benchmark(tmp_path / "p.jsonl", format="visit", column_map="nope=x")


def test_perception_published_rows_with_image_rewrite(tmp_path, sample_images):
    """The published eval rows: parts in orig_*, `original_response`, paths climbing out of the folder."""
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    imgdir = tmp_path / "imgs"
    (imgdir / "mmmu").mkdir(parents=True)
    shutil.copy(sample_images["coffee"], imgdir / "mmmu" / "9900.png")
    rows[0]["orig_score"] = 4  # the published rows carry no gold: give one row a score
    rows[1]["orig_score"] = 3
    f = _write(tmp_path / "data" / "pb.jsonl" if (tmp_path / "data").mkdir() is None else None, rows)
    b = load_benchmark(f, image_rewrites={"../": str(imgdir) + "/"}, allowed_image_dirs=[imgdir])
    assert b.format == "perception"
    assert len(b.items) == 1 and b.items[0].gold == 4
    req = b.items[0].request
    assert req.instruction.startswith("Describe in detail the molecular structure")
    assert req.response.startswith("The molecular structure depicted")
    assert req.rubric.criteria.startswith("Evaluates the model's ability") and req.rubric.complete
    reasons = [s["reason"] for s in b.skipped]
    assert any("image file not found" in r for r in reasons)  # 3215.png was not provided
    assert any("missing gold" in r for r in reasons)


def test_llava_gold_scale_feedback_and_mtbench(tmp_path, sample_images):
    ll = _write(tmp_path / "ll.jsonl", [
        {"question_id": 7, "question": "What is it?", "image": "chelsea.png", "answer": "A cat.", "score": 10,
         "category": "conv", "caption": "a cat"},
        {"question_id": 8, "question": "What is it?", "image": "chelsea.png", "answer": "A cat.", "score": 11},
    ])
    b = load_benchmark(ll, format="llava", image_root=Path(sample_images["chelsea"]).parent, gold_scale=(1, 10))
    assert b.items[0].gold == 5.0 and b.items[0].category == "conv"
    assert "outside the scale" in b.skipped[0]["reason"]

    fb = _write(tmp_path / "fb.jsonl", [{
        "orig_instruction": "Explain tides.", "orig_response": "The moon pulls water.", "orig_reference_answer": "Gravity.",
        "orig_criteria": "Is it correct?", **{f"orig_score{i}_description": f"level {i}" for i in range(1, 6)},
        "orig_score": "2"}])
    b = load_benchmark(fb)
    assert b.format == "feedback" and b.items[0].gold == 2 and not b.has_images
    assert b.items[0].request.rubric.score_descriptions[0] == "level 1"

    conv = lambda q, a, q2, a2: [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                 {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    mt = _write(tmp_path / "mt.jsonl", [
        {"question_id": 81, "model_a": "x", "model_b": "y", "winner": "model_b", "judge": "h1", "turn": 2,
         "conversation_a": conv("Q1", "a1", "Q2", "a2"), "conversation_b": conv("Q1", "b1", "Q2", "b2")},
        {"question_id": 81, "model_a": "x", "model_b": "y", "winner": "tie (bothbad)", "judge": "h2", "turn": 2,
         "conversation_a": conv("Q1", "a1", "Q2", "a2"), "conversation_b": conv("Q1", "b1", "Q2", "b2")},
    ])
    b = load_benchmark(mt)
    assert b.format == "mtbench" and [it.gold for it in b.items] == ["B", "tie"]
    assert b.items[0].id != b.items[1].id  # two votes on one pair stay two items
    r = b.items[0].request
    assert r.instruction.endswith("Q2") and "Earlier turn 1" in r.instruction and (r.response, r.response_b) == ("a2", "b2")


def test_small_helpers():
    assert parse_column_map("gold=r, image=img") == {"gold": "r", "image": "img"}
    assert [normalize_preference(v) for v in ("a", "Response B", "tie (bothbad)", "x")] == ["A", "B", "tie", None]
    with pytest.raises(FileNotFoundError):
        load_benchmark("/nonexistent.jsonl")


def test_visit_release_columns_binary_gold_and_switched_off_field(tmp_path, sample_images):
    """VisIT-Bench's release rates GPT-4's output (kept in `reference_output`) yes/no; the user maps it
    as the response and switches the reference off with '-'."""
    rows = [{"instruction_category": "recognition", "instruction": "Name the animal.", "image": str(sample_images["chelsea"]),
             "reference_output": "A cat.", "human_ratings_gpt4_correct": True, "instruction_conditioned_caption": "A cat."},
            {"instruction_category": "recognition", "instruction": "Name the vehicle.", "image": str(sample_images["rocket"]),
             "reference_output": "A bus.", "human_ratings_gpt4_correct": "false", "instruction_conditioned_caption": "A rocket."},
            {"instruction_category": "x", "instruction": "Name it.", "image": "https://example.com/a.png",
             "reference_output": "A.", "human_ratings_gpt4_correct": True}]
    b = load_benchmark(_write(tmp_path / "v.jsonl", rows), format="visit",
                       column_map="response=reference_output,reference=-", gold_scale=(1, 10))
    assert [(it.gold, it.request.response, it.request.reference_answer) for it in b.items] == [
        (5.0, "A cat.", None), (1.0, "A bus.", None)]
    assert "URLs are not fetched" in b.skipped[0]["reason"]
