"""The full `vlm-judge eval` run: benchmark with real images -> report folder, resume, failures shown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from eval.cli import main
from tests.test_eval_probes import ImageAwareBackend, local_images
from vlm_judge.backends import Generation, GenerationParams, Prompt, register_backend
from vlm_judge.cli import main as vlm_main


class CountingImageAware(ImageAwareBackend):
    """The image-aware test judge, counting generations across instances (to check resume)."""

    total = 0

    def generate(self, prompts, params):
        CountingImageAware.total += len(prompts)
        return super().generate(prompts, params)


class MuteBackend:
    """A judge that never writes a verdict."""

    def __init__(self, model: str = "mute", **_: object) -> None:
        self.name = model

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        return [Generation("I would rather not say.") for _ in prompts]


register_backend("eval-test-aware", "tests.test_eval_cli:CountingImageAware")
register_backend("eval-test-mute", "tests.test_eval_cli:MuteBackend")


def _card(d: Path, backend: str, kind: str = "vision") -> str:
    d.mkdir()
    (d / "vlm_judge.json").write_text(json.dumps({"backend": backend, "kind": kind}))
    return str(d)


@pytest.fixture
def bench(tmp_path, sample_images) -> Path:
    sample_images = local_images(tmp_path, sample_images)
    names = sorted(sample_images)
    rows = []
    for k in range(12):
        n = names[k % 4]
        rows.append({"id": f"a{k}", "instruction": f"Describe the picture ({k}).", "image": str(sample_images[n]),
                     "instruction_conditioned_caption": f"A picture of {n}.", "instruction_category": n,
                     "response": f"It shows {n} ({k}).", "human_ratings": [1 + k % 5, 1 + (k + 1) % 5], "model": "m1"})
    for k in range(6):
        n = names[k % 4]
        rows.append({"id": f"p{k}", "instruction": "Which answer is better?", "image": str(sample_images[n]),
                     "instruction_conditioned_caption": f"A picture of {n}.", "instruction_category": n,
                     "A": f"It is {n}.", "B": "It is a horse.", "human_preference": "A" if k < 5 else "tie"})
    rows.append({"id": "bad1", "instruction": "x", "image": "nope.png", "response": "y", "human_ratings": [3]})
    rows.append({"id": "bad2", "instruction": "x", "image": str(sample_images[names[0]]), "response": "y"})
    p = tmp_path / "visit.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_eval_writes_full_report_and_resumes(tmp_path, bench, capsys):
    aware = _card(tmp_path / "aware_judge", "eval-test-aware")
    out = tmp_path / "report"
    args = [str(bench), "--judge", "mock", "--judge", aware, "--judge", "text:mock", "--probes", "all",
            "--n-boot", "100", "--out", str(out)]
    CountingImageAware.total = 0
    assert vlm_main(["eval", *args]) == 0  # through the real `vlm-judge` dispatcher
    first_calls = CountingImageAware.total
    assert first_calls > 0

    for f in ("report.md", "report.html", "metrics.json", "judgments.jsonl", "config.json"):
        assert (out / f).stat().st_size > 0
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) >= 8
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100

    m = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert m["benchmark"]["items"] == 18 and m["benchmark"]["rows"] == 20
    reasons = {s["id"]: s["reason"] for s in m["benchmark"]["skipped"]}
    assert "image file not found" in reasons["bad1"] and "missing gold" in reasons["bad2"]
    labels = list(m["judges"])
    assert labels == ["vision:mock", f"vision:{aware}", "text:mock"]
    for lab in labels:
        a = m["judges"][lab]["overall"]["absolute"]
        assert a["n"] == 12 and a["n_scored"] == 12 and -1 <= a["spearman"]["value"] <= 1
        assert m["judges"][lab]["overall"]["relative"]["n"] == 6
        assert set(m["judges"][lab]["by_category"]) == {"astronaut", "chelsea", "coffee", "rocket"}
    ground = {lab: next(p for p in m["probes"][lab] if p["probe"] == "grounding") for lab in labels}
    assert ground["vision:mock"]["flagged"] is True
    assert ground[f"vision:{aware}"]["flagged"] is False
    assert ground["text:mock"]["applicable"] == 0
    pairs = {(p["judge_a"], p["judge_b"], p["mode"], p["category"]) for p in m["paired_tests"]}
    assert ("vision:mock", "text:mock", "absolute", "all") in pairs

    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 18 and {r["judge"] for r in rows} == set(labels)
    md = (out / "report.md").read_text()
    assert "IMAGE-BLIND" in md and "bad1" in md and "Paired test" in md and "(plots/probes.png)" in md
    assert "<table>" in (out / "report.html").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["judges"][1] == aware and cfg["n_boot"] == 100

    # a re-run resumes from the cache: no new generations, identical metrics
    CountingImageAware.total = 0
    assert main(args) == 0
    assert CountingImageAware.total == 0
    assert json.loads((out / "metrics.json").read_text())["judges"] == m["judges"]
    assert "report:" in capsys.readouterr().out


def test_judge_that_never_parses_is_shown_not_scored(tmp_path, bench):
    mute = _card(tmp_path / "mute_judge", "eval-test-mute")
    out = tmp_path / "r"
    assert main([str(bench), "--judge", mute, "--judge", "mock", "--n-boot", "100", "--out", str(out),
                 "--max-parse-retries", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    j = m["judges"][f"vision:{mute}"]
    assert j["scored"] == 0 and j["parse_failure_rate"] == 1.0 and j["parse_failures"] == 18
    assert "no score found" in json.dumps(j["failure_reasons"])
    a = j["overall"]["absolute"]
    assert a["n_scored"] == 0 and "spearman" not in a  # no metric from default scores
    paired = [p for p in m["paired_tests"] if p["mode"] == "absolute" and p["category"] == "all"][0]
    assert paired["n"] == 0 and paired["delta"] is None
    md = (out / "report.md").read_text()
    assert "100.0%" in md
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(r["score"] is None and r["status"] == "parse_failure" for r in rows if r["judge"] == f"vision:{mute}")


def test_cli_errors_are_clear(tmp_path, bench, capsys):
    assert main([str(tmp_path / "missing.jsonl"), "--judge", "mock", "--out", str(tmp_path / "o")]) == 2
    assert "benchmark file not found" in capsys.readouterr().err
    assert main([str(bench), "--judge", "mock", "--probes", "order,vibes", "--out", str(tmp_path / "o")]) == 2
    assert "unknown probe" in capsys.readouterr().err
    assert main([str(bench), "--judge", "mock", "--judge", "mock", "--out", str(tmp_path / "o")]) == 2
    assert "judge named twice" in capsys.readouterr().err


def test_eval_judge_served_over_http(tmp_path, bench):
    """A judge behind a real OpenAI-compatible server on 127.0.0.1: images travel over HTTP, so the
    grounding probe still sees the image-aware judge react to an unrelated image."""
    from vlm_judge.serve import start_server

    with start_server(ImageAwareBackend("served-aware"), model_name="served-aware") as h:
        out = tmp_path / "r"
        assert main([str(bench), "--judge", "served-aware@openai", "--base-url", h.base_url, "--probes", "grounding",
                     "--n-boot", "100", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    j = m["judges"]["vision:served-aware@openai"]
    assert j["scored"] == 18
    g = m["probes"]["vision:served-aware@openai"][0]
    assert g["probe"] == "grounding" and g["flagged"] is False and g["applicable"] == 18


def test_cache_is_reused_only_for_the_same_request_and_settings(tmp_path, sample_images):
    from eval.benchmarks import load_benchmark
    from eval.run import judge_cached
    from tests.test_eval_probes import write_bench
    from vlm_judge.scorer import Judge, ScorerConfig

    reqs = [it.request for it in load_benchmark(write_bench(tmp_path, sample_images, rows=4), format="visit").items]
    be = CountingImageAware()
    cache = tmp_path / "c.jsonl"
    CountingImageAware.total = 0
    first = judge_cached(Judge(be, ScorerConfig()), reqs, cache)
    assert CountingImageAware.total == 4
    again = judge_cached(Judge(be, ScorerConfig()), reqs, cache)
    assert CountingImageAware.total == 4 and [j.score for j in again] == [j.score for j in first]
    judge_cached(Judge(be, ScorerConfig(template="prefix")), reqs, cache)  # other settings: judged anew
    assert CountingImageAware.total == 8
    with cache.open("a") as f:
        f.write('{"cut off')  # an interrupted write is skipped, not fatal
    judge_cached(Judge(be, ScorerConfig()), reqs[:2], cache)
    assert CountingImageAware.total == 8
    # a new request after the broken line lands on its own line and is read back next time
    extra = [replace(reqs[0], id="new", instruction="Another question?")]
    judge_cached(Judge(be, ScorerConfig()), extra, cache)
    assert CountingImageAware.total == 9
    judge_cached(Judge(be, ScorerConfig()), extra, cache)
    assert CountingImageAware.total == 9
    # one line per judgment: the torn fragment was cut before the next append, and every line reads
    cached = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(cached) == 9 and len({c["fingerprint"] for c in cached}) == 9


def test_eval_rerun_after_an_outage_judges_exactly_the_errored_items(tmp_path, bench):
    """The judge's server answers HTTP 500 for two items during the first run; the re-run against the
    healthy server sends it exactly those two requests, and the report no longer holds errors."""
    from eval.pipeline import EvalConfig, run_eval
    from tests.fault_server import Fault, start_server
    from vlm_judge.backends.openai import OpenAIBackend
    from vlm_judge.scorer import Judge, ScorerConfig

    down = {"on": True}

    def outage(n: int, body: dict) -> Fault | None:
        text = json.dumps(body)
        hit = "Describe the picture (1)." in text or "Describe the picture (4)." in text
        return Fault(500, message="upstream down") if down["on"] and hit else None

    with start_server(ImageAwareBackend("served"), model_name="served", faults=outage) as srv:
        def judge() -> Judge:
            return Judge(OpenAIBackend("served", base_url=srv.base_url, max_retries=0),
                         ScorerConfig(max_parse_retries=0), name="served")

        cfg = EvalConfig(bench=str(bench), judges=["served@openai"], out=str(tmp_path / "r"), n_boot=100)
        first = run_eval(cfg, judges={"served@openai": judge()})["judgments"]["vision:served@openai"]
        errored = sorted(j.id for j in first if j.status == "error")
        assert errored == ["a1", "a4"] and all("HTTP 500" in j.reason for j in first if j.status == "error")
        down["on"] = False
        before = srv.stats.requests
        again = run_eval(cfg, judges={"served@openai": judge()})["judgments"]["vision:served@openai"]
        assert srv.stats.requests - before == 2  # only the two items that errored were asked again
    assert [j.status for j in again] == ["ok"] * 18
    assert [j.score for j in again if j.id not in errored] == [j.score for j in first if j.id not in errored]


def test_a_second_eval_into_the_same_folder_is_refused(tmp_path, bench, capsys):
    from vlm_judge.jsonl import exclusive_lock

    out = tmp_path / "r"
    (out / "cache").mkdir(parents=True)
    with exclusive_lock(out / "cache", "eval"):  # as if another eval were writing there
        assert main([str(bench), "--judge", "mock", "--n-boot", "100", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another eval is writing to" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists()
    assert main([str(bench), "--judge", "mock", "--n-boot", "100", "--out", str(out)]) == 0  # released: it runs


def test_two_served_judges_on_two_servers_with_backend_args(tmp_path, bench):
    """Each judge reaches its own server (NAME=URL); --backend-arg sets the client's timeout and retries."""
    from vlm_judge.backends.mock import MockBackend
    from vlm_judge.serve import start_server

    with start_server(ImageAwareBackend("aware"), model_name="aware") as a, \
            start_server(MockBackend("blind"), model_name="blind") as b:
        out = tmp_path / "r"
        rc = main([str(bench), "--judge", "aware@openai", "--judge", "blind", "--base-url", f"aware={a.base_url}",
                   "--base-url", f"blind={b.base_url}", "--backend-arg", "timeout=30", "--backend-arg", "max_retries=0",
                   "--n-boot", "100", "--out", str(out), "--no-progress"])
        assert rc == 0
        assert a.stats.requests > 0 and b.stats.requests > 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["judges"]["vision:aware@openai"]["scored"] == 18 and m["judges"]["vision:blind"]["scored"] == 18
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backend_args"] == {"timeout": 30, "max_retries": 0}


def test_eval_exits_3_when_items_errored(tmp_path, bench, capsys):
    from tests.fault_server import Fault, start_server

    with start_server(ImageAwareBackend("down"), model_name="down", faults=lambda n, body: Fault(500)) as h:
        rc = main([str(bench), "--judge", "down@openai", "--base-url", h.base_url, "--backend-arg", "max_retries=0",
                   "--retries", "0", "--n-boot", "100", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 3
    captured = capsys.readouterr()
    assert "errors 18" in captured.out and "18 judgments errored" in captured.err
    assert (tmp_path / "r" / "report.md").is_file()  # the report is still written


def test_eval_shows_progress_and_help_shows_defaults(tmp_path, bench, capsys):
    assert main([str(bench), "--judge", "mock", "--probes", "length", "--n-boot", "100", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "judging (vision:mock)" in err and "probe length (vision:mock)" in err and "18/18" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--retries" in text and "(default: 2)" in text and "(default: 1000)" in text and "--backend-arg" in text
    assert "--max-parse-retries" not in text


def test_no_shared_items_and_inapplicable_probes_say_so(tmp_path, bench, sample_images):
    """The paired test with nothing shared is 'n/a (no shared items)', not 'nan [nan, nan] nan'; the
    order probe on absolute items is 'not applicable'."""
    from tests.test_eval_probes import write_bench

    mute = _card(tmp_path / "mute_judge", "eval-test-mute")
    out = tmp_path / "r"
    assert main([str(bench), "--judge", mute, "--judge", "mock", "--n-boot", "100", "--out", str(out),
                 "--retries", "0", "--no-progress"]) == 0
    md = (out / "report.md").read_text()
    assert "n/a (no shared items)" in md and "nan" not in md
    absolute = write_bench(tmp_path, sample_images, rows=4)
    assert main([str(absolute), "--judge", "mock", "--probes", "order", "--n-boot", "100", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    order = json.loads((tmp_path / "o" / "metrics.json").read_text())["probes"]["vision:mock"][0]
    assert order["probe"] == "order" and order["note"].startswith("not applicable")
    assert "not applicable" in (tmp_path / "o" / "report.md").read_text()


def test_probe_plot_draws_no_value_as_n_a_not_zero(tmp_path):
    from eval.plots import grouped_bars

    zero = grouped_bars(["order"], {"j": [(0.0, 0.0, 0.0)]}, "rate", "t", tmp_path / "zero.png", ylim=(0, 1))
    none = grouped_bars(["order"], {"j": [(None, None, None)]}, "rate", "t", tmp_path / "none.png", ylim=(0, 1))
    with Image.open(zero) as a, Image.open(none) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()  # n/a is drawn, unlike a bar of height 0
