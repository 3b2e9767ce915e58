"""Bias probes: each probe's perturbation, its flip rate, and the image-grounding probe that
exposes the image-blind mock backend and passes a judge whose verdict depends on the image."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from eval.benchmarks import load_benchmark
from eval.probes import DISTRACTOR, PAD, perturb, run_probe
from vlm_judge.backends import Generation, GenerationParams, Prompt
from vlm_judge.backends.mock import MockBackend
from vlm_judge.images import load_image
from vlm_judge.records import JudgeRequest
from vlm_judge.scorer import Judge, ScorerConfig


class ImageAwareBackend:
    """A judge whose verdict is a function of the image's pixels (a real dependency on the image,
    written for these tests): the score is a hash of the decoded RGB bytes."""

    def __init__(self, model: str = "image-aware", **_: object) -> None:
        self.name = model
        self.calls = 0

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        out = []
        for p in prompts:
            self.calls += 1
            pix = b"".join(load_image(im).tobytes() for im in p.images)
            h = int(hashlib.sha256(pix).hexdigest(), 16)
            if "Response B" in p.user:
                out.append(Generation(f"Feedback: compared with the image. [RESULT] {'AB'[h % 2]}"))
            else:
                out.append(Generation(f"Feedback: checked against the image. [RESULT] {h % 5 + 1}"))
        return out


class LengthLoverBackend:
    """Scores by response length: a judge with a pure verbosity bias."""

    def __init__(self, model: str = "length-lover", **_: object) -> None:
        self.name = model

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        out = []
        for p in prompts:
            resp = p.user.split("###Response to evaluate:\n")[1].split("\n\n###")[0]
            out.append(Generation(f"Feedback: long is good. [RESULT] {5 if len(resp) > 60 else 2}"))
        return out


def local_images(tmp: Path, images: dict[str, Path]) -> dict[str, Path]:
    """Copies beside the benchmark file: images are read only from allowed folders (default: the file's)."""
    (tmp / "images").mkdir(exist_ok=True)
    return {n: Path(shutil.copy(p, tmp / "images" / Path(p).name)) for n, p in images.items()}


def write_bench(tmp: Path, images: dict[str, Path], rows: int = 8, pairwise: bool = False) -> Path:
    images = local_images(tmp, images)
    names = sorted(images)
    out = []
    for k in range(rows):
        img = str(images[names[k % len(names)]])
        base = {"id": f"r{k}", "instruction": f"What is shown? ({k})", "image": img,
                "instruction_conditioned_caption": f"A photo of {names[k % len(names)]}.",
                "instruction_category": "even" if k % 2 == 0 else "odd"}
        if pairwise:
            out.append({**base, "A": f"Answer A {k}.", "B": f"Answer B {k}.", "human_preference": "AB"[k % 2],
                        "model_a": "judge-x" if k < 4 else "m1", "model_b": "m2"})
        else:
            out.append({**base, "response": f"Short answer {k}.", "human_ratings": [1 + k % 5],
                        "model": "judge-x" if k < 4 else "m1"})
    p = tmp / ("pair.jsonl" if pairwise else "abs.jsonl")
    p.write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return p


def _judge(backend) -> Judge:
    return Judge(backend, ScorerConfig(max_parse_retries=0))


def _run(probe, judge, bench, **kw):
    items = bench.items
    js = judge.grade([it.request for it in items])
    return run_probe(probe, judge, items, [it.request for it in items], js, **kw)


def test_grounding_flags_image_blind_mock_and_passes_image_aware_judge(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images), format="visit")
    blind = _run("grounding", _judge(MockBackend()), bench)
    assert blind.applicable == 8 and blind.moved == 0 and blind.flagged is True
    assert "image-blind" in blind.note
    aware = _run("grounding", _judge(ImageAwareBackend()), bench)
    assert aware.applicable == 8 and aware.flagged is False and aware.rate >= 0.5
    # each probed request really carried another benchmark image
    for d in aware.details:
        assert d["before"] != d["after"] or not d["moved"]


def test_grounding_with_one_image_uses_noise(tmp_path, sample_images):
    one = {"chelsea": sample_images["chelsea"]}
    bench = load_benchmark(write_bench(tmp_path, one, rows=3), format="visit")
    req = bench.items[0].request
    p = perturb("grounding", req, 3, [req.images])
    assert p.images[0].data is not None and p.images[0].key != req.images[0].key
    assert load_image(p.images[0]).size == (64, 64)


def test_length_probe_catches_verbosity_bias(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images), format="visit")
    req = bench.items[0].request
    padded = perturb("length", req, 2, [])
    assert padded.response.startswith(req.response) and PAD in padded.response and len(padded.response) > 2 * len(req.response)
    biased = _run("length", _judge(LengthLoverBackend()), bench)
    assert (biased.moved, biased.applicable, biased.rate) == (8, 8, 1.0)
    steady = _run("length", _judge(ImageAwareBackend()), bench)  # ignores the text entirely
    assert steady.moved == 0 and steady.rate == 0.0


def test_relative_probes_perturb_the_right_response(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, pairwise=True), format="visit")
    req = bench.items[0].request
    o = perturb("order", req, "A", [])
    assert (o.response, o.response_b) == (req.response_b, req.response)
    ln = perturb("length", req, "A", [])  # judge preferred A: pad B
    assert ln.response == req.response and PAD in ln.response_b
    bw = perturb("bandwagon", req, "A", [])
    assert "preferred Response B" in bw.instruction
    ds = perturb("distraction", req, "A", [])
    assert ds.response.endswith(DISTRACTOR) and ds.response_b == req.response_b
    single = JudgeRequest(instruction="q", response="r", rubric=req.rubric.__class__("c", tuple("abcde")), id="x")
    ab = perturb("bandwagon", single, 5, [])  # scored 5: the nudge points the other way
    assert "rated it 1 out of 5" in ab.instruction


def test_order_probe_uses_both_orders_and_counts_flips(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, pairwise=True), format="visit")

    # always answers "A" whatever the order: a pure position bias, so every swap flips the verdict
    first = MockBackend(script=lambda p, n: "Feedback: first one. [RESULT] A")
    r = _run("order", _judge(first), bench)
    assert (r.moved, r.applicable) == (8, 8)
    # a judge that reads content: prefers the response mentioning 'A Answer'... i.e. always the real A
    content = MockBackend(script=lambda p, n: "Feedback: x. [RESULT] " + (
        "A" if p.user.index("Answer A") < p.user.index("Answer B") else "B"))
    r = _run("order", _judge(content), bench)
    assert (r.moved, r.applicable) == (0, 8)


def test_self_preference_by_hand(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images, pairwise=True), format="visit")
    # rows 0..3 have model_a == judge-x; humans prefer A on even rows, B on odd rows.
    # The judge always says A: it overrules humans on its own rows 1 and 3 (2 of the 2 own rows
    # where humans preferred B) and on other rows 5 and 7 (2 of 4 decided other rows).
    always_a = MockBackend(script=lambda p, n: "Feedback: x. [RESULT] A")
    judge = Judge(always_a, ScorerConfig(swap=False, max_parse_retries=0))
    r = _run("self", judge, bench, self_names=["judge-x"])
    assert (r.moved, r.applicable, r.rate) == (2, 2, 1.0)
    assert r.baseline_rate == pytest.approx(2 / 4)
    none = _run("self", judge, bench, self_names=[])
    assert none.applicable == 0 and "not applicable" in none.note


def test_unparsed_verdicts_are_counted_not_scored(tmp_path, sample_images):
    bench = load_benchmark(write_bench(tmp_path, sample_images), format="visit")
    mute = MockBackend(script=lambda p, n: "I cannot decide.")
    r = _run("distraction", _judge(mute), bench)
    assert r.applicable == 0 and r.unreadable == 8 and r.rate != r.rate  # NaN: no rate, not 0
