"""The scorer's logic with the deterministic mock backend (scripted where a test needs a behaviour)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from vlm_judge.backends import Generation, GenerationParams, Prompt
from vlm_judge.backends.mock import MockBackend
from vlm_judge.records import ImageRef, JudgeRequest, Rubric
from vlm_judge.scorer import JUDGE_CARD, Judge, ScorerConfig

RUBRIC = Rubric("Is the answer correct?", ("wrong", "mostly wrong", "half", "mostly right", "right"))


class Recorder:
    """A backend that answers with `answer(prompt, params)` and records every call's batch and params."""

    name = "recorder"

    def __init__(self, answer) -> None:
        self.answer = answer
        self.batches: list[list[Prompt]] = []
        self.params: list[GenerationParams] = []

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        self.batches.append(list(prompts))
        self.params.append(params)
        out = []
        for p in prompts:
            text = self.answer(p, params)
            out.append(Generation(text=None, error=text[6:]) if text.startswith("ERROR:") else Generation(text=text))
        return out


def reqs(n: int, **kw) -> list[JudgeRequest]:
    return [JudgeRequest(f"Question {k}?", f"Answer {k}.", RUBRIC, id=f"r{k}", **kw) for k in range(n)]


def test_parse_failures_are_retried_a_bounded_counted_number_of_times():
    calls: dict[str, int] = {}

    def answer(p: Prompt, params: GenerationParams) -> str:
        key = p.user.split("evaluate:\n")[1].split("\n")[0]
        calls[key] = calls.get(key, 0) + 1
        if "Question 0" in key:
            return "Feedback: I am not sure."  # never parses
        if "Question 1" in key and calls[key] == 1:
            return "Feedback: cut off [RESULT]"  # parses on the retry
        return "Feedback: fine. [RESULT] 4"

    be = Recorder(answer)
    out = Judge(be, ScorerConfig(max_parse_retries=2)).grade(reqs(3))
    assert [j.status for j in out] == ["parse_failure", "ok", "ok"]
    assert [j.attempts for j in out] == [3, 2, 1]
    assert out[0].score is None and out[0].reason == "no score found" and out[0].raw_output == "Feedback: I am not sure."
    assert out[1].score == 4
    # greedy first try, then sampled retries (a greedy retry would repeat itself), each a new seed
    assert [p.temperature for p in be.params] == [0.0, 0.7, 0.7]
    assert len({p.seed for p in be.params}) == 3
    out0 = Judge(Recorder(answer), ScorerConfig(max_parse_retries=0)).grade(reqs(1))
    assert out0[0].attempts == 1 and out0[0].status == "parse_failure"


def test_backend_errors_fail_their_row_only():
    def answer(p, params):
        return "ERROR:model crashed" if "Question 1" in p.user else "Feedback: ok. [RESULT] 5"

    out = Judge(Recorder(answer), ScorerConfig(max_parse_retries=1)).grade(reqs(3))
    assert [j.status for j in out] == ["ok", "error", "ok"]
    assert out[1].reason == "model crashed" and out[1].attempts == 2 and out[1].score is None


def test_bad_rows_in_the_list_api_become_error_judgments_and_the_rest_is_scored(tmp_path):
    out = Judge(MockBackend()).absolute_grade(
        ["q0", "q1", "q2"], ["fine", "  ", "fine"], RUBRIC, images=[None, None, str(tmp_path / "gone.png")],
        ids=["a", "b", "c"],
    )
    assert [j.id for j in out] == ["a", "b", "c"]
    assert [j.status for j in out] == ["ok", "error", "error"]
    assert "'response'" in out[1].reason and "not found" in out[2].reason


def test_swap_calls_a_disagreement_a_tie_and_maps_swapped_verdicts_back():
    rel = [JudgeRequest("Which?", "the correct one", RUBRIC, response_b="a wrong one", mode="relative", id="x")]
    always_a = Recorder(lambda p, params: "Feedback: first is better. [RESULT] A")  # pure position bias
    [j] = Judge(always_a, ScorerConfig()).grade(rel)
    assert j.score == "tie" and j.samples == ["A", "B"] and j.attempts == 2

    def content(p, params):  # prefers whichever response says "correct", wherever it is
        a = p.user.split("###Response A:\n")[1].split("\n")[0]
        return f"Feedback: ok. [RESULT] {'A' if 'correct' in a else 'B'}"

    [j] = Judge(Recorder(content), ScorerConfig()).grade(rel)
    assert j.score == "A" and j.samples == ["A", "A"]
    swapped = [JudgeRequest("Which?", "a wrong one", RUBRIC, response_b="the correct one", mode="relative")]
    assert Judge(Recorder(content)).grade(swapped)[0].score == "B"
    [j] = Judge(always_a, ScorerConfig(swap=False)).grade(rel)
    assert j.score == "A" and j.attempts == 1


SEQ = {0: 3, 1000: 4, 2000: 2, 3000: 2, 4000: 5}


def by_seed(p, params):
    return f"Feedback: ok. [RESULT] {SEQ[params.seed]}"


@pytest.mark.parametrize(("aggregate", "n", "score", "mean"), [
    ("mean", 3, 3, 3.0), ("majority", 3, 3, 3.0), ("mean", 5, 3, 3.2), ("majority", 5, 2, 3.2),
])
def test_n_samples_aggregate_by_mean_or_majority(aggregate, n, score, mean):
    cfg = ScorerConfig(n_samples=n, aggregate=aggregate, params=GenerationParams(temperature=1.0, seed=0))
    [j] = Judge(Recorder(by_seed), cfg).grade(reqs(1))
    assert j.samples == [SEQ[1000 * s] for s in range(n)]
    assert j.score == score and j.mean_score == pytest.approx(mean)


def test_majority_tie_breaks_toward_the_mean():
    seq = {0: 1, 1000: 1, 2000: 4, 3000: 4, 4000: 3}
    cfg = ScorerConfig(n_samples=5, aggregate="majority", params=GenerationParams(temperature=1.0, seed=0))
    [j] = Judge(Recorder(lambda p, params: f"[RESULT] {seq[params.seed]}"), cfg).grade(reqs(1))
    assert j.score == 4  # 1 and 4 have two votes each; 4 is nearer the mean 2.6


def test_seeds_make_sampled_judgments_reproducible():
    def run(seed):
        cfg = ScorerConfig(n_samples=4, params=GenerationParams(temperature=0.8, seed=seed))
        return [(j.score, j.samples) for j in Judge(MockBackend(), cfg).grade(reqs(6))]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert any(len(set(s)) > 1 for _, s in run(1))  # samples really differ within a row


def test_requests_are_grouped_by_image_into_batches():
    a, b = ImageRef(data=b"image-a"), ImageRef(data=b"image-b")
    rows = [JudgeRequest(f"Q{k}?", f"A{k}.", RUBRIC, images=[a if k % 2 else b], id=str(k)) for k in range(6)]
    be = Recorder(lambda p, params: "[RESULT] 3")
    out = Judge(be, ScorerConfig(batch_size=3)).grade(rows)
    assert [j.id for j in out] == [str(k) for k in range(6)]  # order restored
    assert len(be.batches) == 2
    for batch in be.batches:
        assert len({p.images for p in batch}) == 1


def test_bad_configs_fail_at_construction():
    for kw in (dict(batch_size=0), dict(max_parse_retries=-1), dict(n_samples=0), dict(n_samples=2), dict(aggregate="median")):
        with pytest.raises(ValueError):
            ScorerConfig(**kw)


def test_judge_folder_card_picks_backend_and_template(tmp_path):
    (tmp_path / JUDGE_CARD).write_text(json.dumps({"backend": "mock", "template": "prefix", "kind": "text"}))
    judge = Judge.load(str(tmp_path))
    [j] = judge.absolute_grade("What is 2+2?", "4", RUBRIC, reference_answers="4")
    assert j.template == "prefix" and j.judge == str(tmp_path) and j.status == "ok"
    assert judge.backend.calls[0].user.index("###Score Rubrics") < judge.backend.calls[0].user.index("###Response to")


def test_images_argument_is_per_row():
    a, b = ImageRef(data=b"a"), ImageRef(data=b"b")
    judge = Judge(MockBackend())
    judge.absolute_grade(["q1", "q2"], ["r1", "r2"], RUBRIC, images=[a, b])
    assert sorted(im.key for p in judge.backend.calls for im in p.images) == sorted([a.key, b.key])
    assert all(len(p.images) == 1 for p in judge.backend.calls)
    judge = Judge(MockBackend())
    judge.absolute_grade("q", "r", RUBRIC, images=[a, b])  # one row: its two images
    assert judge.backend.calls[0].images == (a, b)
    with pytest.raises(ValueError, match="one entry per row"):
        Judge(MockBackend()).absolute_grade(["q1", "q2", "q3"], ["r"] * 3, RUBRIC, images=[a, b])
