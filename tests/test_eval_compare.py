"""Text vs vision comparison, per-judge agreement with known values, and the expected score."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from eval.agreement import judge_metrics
from eval.benchmarks import load_benchmark
from eval.captions import caption_with_model
from eval.compare import paired_tests, side_by_side, text_requests
from eval.expected import continuation, expected_scores
from eval.pipeline import EvalConfig, run_eval
from tests.test_eval_probes import ImageAwareBackend, write_bench
from text_judge import bridge_instruction
from vlm_judge.backends import Generation, GenerationParams, Prompt
from vlm_judge.backends.mock import MockBackend
from vlm_judge.records import Judgment
from vlm_judge.scorer import Judge, ScorerConfig


def _j(item_id: str, score, mode: str = "absolute", samples=None) -> Judgment:
    status = "ok" if score is not None else "parse_failure"
    return Judgment(id=item_id, mode=mode, score=score, status=status, samples=samples or [])


def test_text_requests_carry_caption_not_image(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, rows=4), format="visit")
    bench.items[1].caption = None  # this item has no caption: the text judge must not judge it blind
    reqs, missing = text_requests(bench.items)
    # the text judge's own layout, not a copy
    assert reqs[0].instruction == bridge_instruction(bench.items[0].request.instruction, ["A photo of astronaut."])
    assert reqs[0].instruction.startswith("Image description: A photo of astronaut.\n\n")
    assert reqs[0].images == () and "A photo of astronaut." in reqs[0].instruction
    assert bench.items[0].request.instruction in reqs[0].instruction
    assert reqs[1] is None and "no caption" in missing[bench.items[1].id]
    caps = {bench.items[2].request.image_key: "MODEL CAPTION"}
    reqs2, missing2 = text_requests(bench.items, caps)
    assert "MODEL CAPTION" in reqs2[2].instruction and len(missing2) == 3


def test_caption_with_model_captions_each_image_once(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, rows=8), format="visit")  # 4 images, twice each
    seen = []
    cap = MockBackend(script=lambda p, n: seen.append(p.images) or f"caption {n}")
    caps, errs, source = caption_with_model(cap, [it.request for it in bench.items])
    assert len(caps) == 4 and not errs and len(seen) == 4 and "mock" in source
    assert all(len(ims) == 1 for ims in seen)


def test_agreement_by_hand(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, rows=10), format="visit")
    items = bench.items  # gold = 1 + k % 5, categories even/odd
    perfect = [_j(it.id, int(it.gold)) for it in items]
    m = judge_metrics(items, perfect, n_boot=200)
    a = m["overall"]["absolute"]
    assert a["spearman"]["value"] == pytest.approx(1.0) and a["exact"]["value"] == 1.0
    assert a["kappa_quadratic"] == pytest.approx(1.0) and a["alpha_interval_with_humans"] == pytest.approx(1.0)
    off = [_j(it.id, min(5, int(it.gold) + 1)) for it in items]
    a = judge_metrics(items, off, n_boot=200)["overall"]["absolute"]
    # gold 1..5 twice; +1 capped: exact only where gold is 5 (2 of 10), all within one
    assert a["exact"]["value"] == pytest.approx(0.2) and a["within_one"]["value"] == 1.0
    half = [_j(it.id, int(it.gold) if k < 5 else None) for k, it in enumerate(items)]
    mh = judge_metrics(items, half, n_boot=200)
    assert mh["parse_failure_rate"] == 0.5 and mh["overall"]["absolute"]["n_scored"] == 5
    assert set(mh["by_category"]) == {"even", "odd"}

    pb = load_benchmark(write_bench(tmp_path, sample_images, rows=4, pairwise=True), format="visit")
    # gold A, B, A, B; judge: A, A, tie, B with orders (A,A) (A,A) (A,B) (B,B)
    js = [_j("0", "A", "relative", ["A", "A"]), _j("1", "A", "relative", ["A", "A"]),
          _j("2", "tie", "relative", ["A", "B"]), _j("3", "B", "relative", ["B", "B"])]
    r = judge_metrics(pb.items, js, n_boot=200)["overall"]["relative"]
    assert r["accuracy"]["value"] == pytest.approx(2.5 / 4) and r["accuracy_strict"] == pytest.approx(0.5)
    assert r["position_consistency"] == pytest.approx(0.75) and r["judge_tie_rate"] == 0.25


def test_side_by_side_and_paired_tests(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, rows=20), format="visit")
    items = bench.items
    good = [_j(it.id, int(it.gold)) for it in items]
    noisy = [_j(it.id, [3, 1, 5, 2, 4][k % 5]) for k, it in enumerate(items)]
    res = {"vision:a": good, "text:b": noisy}
    ms = {k: judge_metrics(items, v, n_boot=200) for k, v in res.items()}
    rows = side_by_side(ms, "absolute")
    assert [(r["category"], r["judge"]) for r in rows[:2]] == [("all", "vision:a"), ("all", "text:b")]
    assert {r["category"] for r in rows} == {"all", "even", "odd"}
    tests = paired_tests(items, res, n_boot=300)
    overall = next(t for t in tests if t["category"] == "all")
    assert overall["judge_a"] == "vision:a" and overall["delta"] > 0.5 and overall["p_value"] < 0.05


class ProbsBackend:
    """Scripted judge with next_token_probs: writes '[RESULT] 4' and puts 0.5 on '4', 0.5 on '2'
    (so the expected score is 3 beside the sampled 4)."""

    def __init__(self, model: str = "probs", **_: object) -> None:
        self.name = model
        self.seen: list[str] = []

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        return [Generation("Feedback: fine. So the overall score is 4.\n[RESULT] 4") for _ in prompts]

    def next_token_probs(self, prompts, continuations, candidates):
        self.seen += list(continuations)
        return [{"1": 0.0, "2": 0.25, "3": 0.0, "4": 0.25, "5": 0.0, "x": 0.5} for _ in prompts]


def test_expected_score_from_probabilities(tmp_path, sample_images):
    assert continuation("Good. [RESULT] 4") == ("Good. [RESULT] ", False)
    assert continuation("Good. [RESULT] 2 then [RESULT] 4")[0] == "Good. [RESULT] 2 then [RESULT] "
    assert continuation("No marker here.") == ("No marker here.\n[RESULT] ", True)
    bench = load_benchmark(write_bench(tmp_path, sample_images, rows=3), format="visit")
    be = ProbsBackend()
    judge = Judge(be, ScorerConfig())
    reqs = [it.request for it in bench.items]
    js = judge.grade(reqs)
    ex = expected_scores(judge, reqs, js)
    assert [e["expected"] for e in ex] == [3.0, 3.0, 3.0] and ex[0]["mass"] == 0.5 and not ex[0]["forced"]
    assert be.seen[0].endswith("[RESULT] ")
    with pytest.raises(TypeError, match="next_token_probs"):
        expected_scores(Judge(MockBackend()), reqs, js)

    # through run_eval: the metric appears beside the sampled score; a judge without the
    # capability gets a note, not a made-up number
    cfg = EvalConfig(bench=str(tmp_path / "abs.jsonl"), judges=["probs", "mock"], out=str(tmp_path / "o"),
                     expected_score=True, n_boot=100, format="visit")
    res = run_eval(cfg, judges={"probs": Judge(ProbsBackend(), ScorerConfig())})
    assert [e["expected"] for e in res["expected"]["vision:probs"]] == [3.0, 3.0, 3.0]
    assert "vision:mock" not in res["expected"] and "no next_token_probs" in res["notes"][0]
    es = res["metrics"]["vision:probs"]["overall"]["absolute"]["expected_score"]
    assert es["n"] == 3 and es["forced"] == 0


def test_vision_vs_text_on_image_dependent_items(tmp_path, sample_images):
    """A vision judge that uses the image vs a text judge given the caption: both run on the same
    items through run_eval, and the text judge's requests have no image."""
    path = write_bench(tmp_path, sample_images, rows=8)
    seen: list[Prompt] = []
    text_be = MockBackend(script=lambda p, n: seen.append(p) or "Feedback: ok. [RESULT] 3")
    cfg = EvalConfig(bench=str(path), judges=["vision:aware", "text:captioned"], out=str(tmp_path / "o"),
                     n_boot=100, probes=["grounding"], format="visit")
    res = run_eval(cfg, judges={"vision:aware": Judge(ImageAwareBackend()), "text:captioned": Judge(text_be)})
    assert all(not p.images and "Image description: A photo of" in p.user for p in seen)
    assert res["probes"]["vision:aware"][0]["flagged"] is False
    assert res["probes"]["text:captioned"][0]["applicable"] == 0
    assert res["caption_source"] == "benchmark"
    json.dumps(res["metrics"], allow_nan=False)  # valid JSON: no NaN leaks


def test_captions_from_a_named_model_and_rubric_file(tmp_path, sample_images):
    """--caption-model: the text judge gets the captioning model's words and the report names it."""
    from eval.cli import main

    path = write_bench(tmp_path, sample_images, rows=4)
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("[Is the colour right?]\n" + "\n".join(f"Score {i}: level {i}" for i in range(1, 6)))
    out = tmp_path / "o"
    assert main([str(path), "--judge", "text:mock", "--caption-model", "capmodel", "--caption-backend", "mock",
                 "--rubric", str(rubric), "--n-boot", "100", "--out", str(out), "--format", "visit"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["caption_source"].startswith("model capmodel") and "[mock backend]" in m["caption_source"]
    assert m["judges"]["text:mock"]["scored"] == 4
    md = (out / "report.md").read_text()
    assert "caption source: **model capmodel" in md
    res = run_eval(EvalConfig(bench=str(path), judges=["text:mock"], rubric=str(rubric), out=str(out), n_boot=100,
                              format="visit", caption_model="capmodel", caption_backend="mock"))
    assert res["items"][0].request.rubric.criteria == "Is the colour right?"
