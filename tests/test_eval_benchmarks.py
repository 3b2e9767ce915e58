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
    b = load_benchmark(_write(tmp_path / "visit.jsonl", visit_rows(imgs)), format="visit",
                       allowed_image_dirs=[Path(imgs["chelsea"]).parent, tmp_path])
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
    b = load_benchmark(_write(tmp_path / "p.jsonl", rows), format="visit", column_map="id=qid,image=img",
                       allowed_image_dirs=[sample_images["chelsea"].parent])
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
                       column_map="response=reference_output,reference=-", gold_scale=(1, 10),
                       allowed_image_dirs=[sample_images["chelsea"].parent])
    assert [(it.gold, it.request.response, it.request.reference_answer) for it in b.items] == [
        (5.0, "A cat.", None), (1.0, "A bus.", None)]
    assert "URLs are not fetched" in b.skipped[0]["reason"]


def test_visit_reads_a_human_score_column(tmp_path, sample_images):
    d = Path(sample_images["chelsea"]).parent
    row = {"id": "h1", "instruction": "What animal?", "image": "chelsea.png", "response": "A cat.", "human_score": 4,
           "instruction_conditioned_caption": "A cat."}
    b = load_benchmark(_write(tmp_path / "v.jsonl", [row]), format="visit", image_root=d)
    assert [(it.id, it.gold) for it in b.items] == [("h1", 4.0)], b.skipped


def test_an_absolute_image_path_outside_the_allowed_folders_is_refused(tmp_path, sample_images):
    row = {"id": "a1", "instruction": "What animal?", "image": str(sample_images["chelsea"]), "response": "A cat.",
           "human_ratings": [4], "instruction_conditioned_caption": "A cat."}
    path = _write(tmp_path / "v.jsonl", [row])
    b = load_benchmark(path, format="visit")
    assert not b.items and "outside the allowed folders" in b.skipped[0]["reason"]
    b = load_benchmark(path, format="visit", allowed_image_dirs=[Path(sample_images["chelsea"]).parent])
    assert [it.id for it in b.items] == ["a1"]


def _rubric_files(tmp: Path) -> dict[str, Path]:
    r = {"criteria": "Is it right?", **{f"score{i}_description": f"level {i}" for i in range(1, 6)}}
    files = {"one.json": json.dumps(r), "one.yaml": "criteria: Is it right?\n" + "".join(
        f"score{i}_description: level {i}\n" for i in range(1, 6)),
        "one.txt": "[Is it right?]\n" + "\n".join(f"Score {i}: level {i}" for i in range(1, 6)),
        "lib.yaml": "default:\n  criteria: Is it right?\n" + "".join(f"  score{i}_description: level {i}\n"
                                                                      for i in range(1, 6)) + "other: |\n  [Other?]\n"
        + "".join(f"  Score {i}: o{i}\n" for i in range(1, 6))}
    out = {}
    for name, text in files.items():
        (tmp / name).write_text(text)
        out[name] = tmp / name
    return out


def test_score_and_eval_accept_the_same_rubric_files(tmp_path):
    from vlm_judge.inputs import load_rubrics
    from vlm_judge.records import Rubric

    want = Rubric("Is it right?", tuple(f"level {i}" for i in range(1, 6)))
    bench = _write(tmp_path / "fb.jsonl", [{"instruction": "Explain tides.", "response": "The moon.", "gold": 3}])
    for name, path in _rubric_files(tmp_path).items():
        assert load_rubrics(path)[0] == want, name  # what `score --rubric` reads
        b = load_benchmark(bench, format="jsonl", rubric=path)  # what `eval --rubric` reads
        assert b.items[0].request.rubric == want, (name, b.skipped)


def test_eval_run_takes_a_yaml_rubric_library(tmp_path):
    from eval.pipeline import EvalConfig, run_eval

    bench = _write(tmp_path / "b.jsonl", [{"id": f"r{k}", "instruction": f"Q{k}?", "response": "A.", "gold": 1 + k % 5}
                                           for k in range(4)])
    res = run_eval(EvalConfig(bench=str(bench), judges=["mock"], rubric=str(_rubric_files(tmp_path)["lib.yaml"]),
                              out=str(tmp_path / "o"), n_boot=100, probes=[]))
    assert res["items"][0].request.rubric.criteria == "Is it right?"


def test_csv_benchmark_and_bad_lines_with_line_numbers(tmp_path):
    (tmp_path / "b.csv").write_text("id,instruction,response,gold\nc1,Q?,A.,4\nc2,Q?,,3\n")
    b = load_benchmark(tmp_path / "b.csv")
    assert [(it.id, it.gold, it.row) for it in b.items] == [("c1", 4.0, 2)]
    assert b.skipped[0]["row"] == 3 and "response" in b.skipped[0]["reason"]
    (tmp_path / "b.jsonl").write_bytes(b'{"instruction": "Q?", "response": "A.", "gold": 4}\n\n[1]\n\xff\n')
    b = load_benchmark(tmp_path / "b.jsonl", format="jsonl")
    assert len(b.items) == 1 and [s["row"] for s in b.skipped] == [3, 4]
    assert "line 3" in b.skipped[0]["reason"] and "line 4" in b.skipped[1]["reason"]
