"""`vlm-judge eval` with a real tiny transformers judge (random LLaVA) beside the mock judge.

A random model rarely writes a readable verdict: the report must say so (its unreadable rate)
instead of scoring it, and its expected score still comes from its real next-token probabilities.
"""

from __future__ import annotations

import json

import pytest

from eval.cli import main

pytest.importorskip("torch")
pytest.importorskip("vlm_judge.backends.hf")


def test_eval_with_tiny_hf_llava_and_mock(tmp_path, tiny_llava_dir, sample_images):
    from tests.test_eval_probes import local_images

    sample_images = local_images(tmp_path, sample_images)
    names = sorted(sample_images)
    rows = [{"id": f"a{k}", "instruction": "What is in the picture?", "image": str(sample_images[names[k]]),
             "instruction_conditioned_caption": f"A picture of {names[k]}.", "response": f"It is {names[k]}.",
             "human_ratings": [k + 1, k + 2], "instruction_category": "c1" if k < 2 else "c2"} for k in range(4)]
    rows.append({"id": "p0", "instruction": "Which is right?", "image": str(sample_images["chelsea"]),
                 "instruction_conditioned_caption": "A cat.", "A": "A cat.", "B": "A dog.", "human_preference": "A"})
    bench = tmp_path / "b.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "rep"
    hf = f"{tiny_llava_dir}@hf"
    assert main([str(bench), "--judge", hf, "--judge", "mock", "--probes", "grounding,order", "--expected-score",
                 "--max-new-tokens", "12", "--max-parse-retries", "0", "--n-boot", "100", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    label = f"vision:{tiny_llava_dir}@hf"
    j = m["judges"][label]
    assert j["n"] == 5 and j["scored"] + j["parse_failures"] + j["errors"] == 5
    # whatever it wrote, unreadable rows carry no score
    rows_out = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    hf_rows = [r for r in rows_out if r["judge"] == label]
    assert all((r["score"] is None) == (r["status"] != "ok") for r in hf_rows)
    assert all(r["raw_output"] for r in hf_rows if r["status"] != "error")
    # the expected score comes from the model's probabilities over 1..5 (marker forced when absent)
    exp = [r["expected_score"] for r in hf_rows if r["mode"] == "absolute"]
    assert all(e is not None and 1.0 <= e["expected"] <= 5.0 and 0 < e["mass"] <= 1.0 for e in exp)
    es = j["overall"]["absolute"]["expected_score"]
    assert es["n"] == 4
    md = (out / "report.md").read_text()
    assert label in md and "Expected score" in md
    ground = next(p for p in m["probes"][label] if p["probe"] == "grounding")
    assert ground["applicable"] + ground["unreadable"] == 5
