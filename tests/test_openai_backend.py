"""The `openai` backend against a REAL OpenAI-compatible server on 127.0.0.1 (vlm_judge.serve).

The server runs the mock backend, so verdicts can be compared with the mock called directly;
faults (500, 429 + Retry-After, slow replies, malformed bodies) are injected by the server.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import pytest

from tests.fault_server import Fault, start_server
from vlm_judge.backends import get_backend
from vlm_judge.backends.base import GenerationParams, Prompt
from vlm_judge.backends.mock import MockBackend
from vlm_judge.backends.openai import OpenAIBackend, _retry_after, image_data_url, image_mime
from vlm_judge.records import ImageRef, Rubric
from vlm_judge.scorer import Judge, ScorerConfig

RUBRIC = Rubric(
    "Does the answer describe the picture accurately?",
    ("Wrong.", "Mostly wrong.", "Partly right.", "Mostly right.", "Fully right."),
)
P = GenerationParams(max_new_tokens=64)


def client(url: str | list[str], **kw) -> OpenAIBackend:
    kw.setdefault("backoff", 0.01)
    if isinstance(url, list):
        return OpenAIBackend("mock", base_urls=url, **kw)
    return OpenAIBackend("mock", base_url=url, **kw)


@pytest.fixture
def served():
    """Start servers on free ports; all stopped at the end of the test."""
    handles = []

    def start(backend=None, **kw):
        h = start_server(backend or MockBackend("mock"), **kw)
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()


def dead_url() -> str:
    """A URL on a port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


# ---- the whole path: Judge -> openai backend -> HTTP -> server -> mock --------------------


def test_judge_over_http_matches_mock_directly(served, sample_images):
    h = served()
    n = 6
    kwargs = dict(
        instructions=[f"Describe image {i}." for i in range(n)],
        responses=[f"It shows thing number {i}." for i in range(n)],
        rubric=RUBRIC,
        images=[[str(sample_images["astronaut"])] if i % 2 else None for i in range(n)],
    )
    direct = Judge(MockBackend("mock")).absolute_grade(**kwargs)
    remote_judge = Judge.load("mock", backend="openai", base_url=h.base_url, backoff=0.01)
    remote = remote_judge.absolute_grade(**kwargs)
    assert [j.score for j in remote] == [j.score for j in direct]
    assert all(j.status == "ok" and j.score in (1, 2, 3, 4, 5) for j in remote)
    assert [j.raw_output for j in remote] == [j.raw_output for j in direct]
    rel_kw = dict(instructions=["Which is better?"] * 3, responses_a=["a1", "a2", "a3"],
                  responses_b=["b1", "b2", "b3"], rubric=RUBRIC)
    assert [j.score for j in remote_judge.relative_grade(**rel_kw)] == \
        [j.score for j in Judge(MockBackend("mock")).relative_grade(**rel_kw)]
    assert h.stats.requests == n + 2 * 3  # relative rows are judged in both orders


def test_images_arrive_byte_identical_as_data_urls(served, sample_images):
    seen_urls: list[str] = []

    def spy(n, body):  # a "fault" that only records what came over the wire
        for part in body["messages"][-1]["content"]:
            if part["type"] == "image_url":
                seen_urls.append(part["image_url"]["url"])
        return None

    mock = MockBackend("mock")
    h = served(mock, faults=spy)
    paths = [sample_images["chelsea"], sample_images["coffee"]]
    jpeg = _jpeg_bytes(sample_images["rocket"])
    prompts = [
        Prompt(user="two photos", images=(ImageRef(path=str(paths[0])), ImageRef(path=str(paths[1])))),
        Prompt(user="embedded jpeg", images=(ImageRef(data=jpeg),), system="You are a judge."),
    ]
    gens = client(h.base_url).generate(prompts, P)
    assert all(g.error is None for g in gens), gens
    by_text = {c.user: c for c in mock.calls}
    got = [im.data for im in by_text["two photos"].images]
    assert got == [paths[0].read_bytes(), paths[1].read_bytes()]
    assert by_text["embedded jpeg"].images[0].data == jpeg
    assert by_text["embedded jpeg"].system == "You are a judge."
    assert sorted(u.split(";")[0] for u in seen_urls) == ["data:image/jpeg", "data:image/png", "data:image/png"]


def _jpeg_bytes(png_path) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(png_path).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


# ---- retries and failures ------------------------------------------------------------------


def test_500_then_success_is_retried(served):
    h = served(faults={1: Fault(500, message="warming up")})
    [g] = client(h.base_url).generate([Prompt(user="hi")], P)
    assert g.error is None and "[RESULT]" in g.text
    assert g.extra["attempts"] == 2
    assert list(h.stats.statuses) == [500, 200]
    assert g.completion_tokens > 0 and g.prompt_tokens > 0  # usage travels back


def test_permanent_500_fails_only_that_row(served):
    def script(prompt, _n):
        if "POISON" in prompt.user:
            raise RuntimeError("the model crashed on this input")
        return "Feedback: fine. [RESULT] 4"

    h = served(MockBackend("mock", script=script))
    judge = Judge(client(h.base_url, max_retries=2), ScorerConfig(max_parse_retries=0))
    out = judge.absolute_grade(
        instructions=["q1", "q2 POISON", "q3"], responses=["r1", "r2", "r3"], rubric=RUBRIC
    )
    assert [j.score for j in out] == [4, None, 4]
    bad = out[1]
    assert bad.status == "error"
    assert "HTTP 500 after 2 retries" in bad.reason
    assert "the model crashed on this input" in bad.reason


def test_429_retry_after_is_honoured(served):
    h = served(faults={1: Fault(429, retry_after=0.6, message="slow down")})
    t0 = time.monotonic()
    [g] = client(h.base_url, backoff=0.001).generate([Prompt(user="hi")], P)
    elapsed = time.monotonic() - t0
    assert g.error is None and g.extra["attempts"] == 2
    assert elapsed >= 0.6, f"retried after {elapsed:.2f}s, before the server's Retry-After of 0.6s"


def test_retry_after_beyond_the_limit_fails_the_row(served):
    h = served(faults={1: Fault(503, retry_after=3600, message="maintenance")})
    [g] = client(h.base_url, max_retry_after=10).generate([Prompt(user="hi")], P)
    assert g.text is None and "retry after 3600s" in g.error and "maintenance" in g.error
    assert h.stats.requests == 1


def test_429_on_one_endpoint_fails_over_at_once(served):
    busy = served(faults=lambda n, body: Fault(429, retry_after=30, message="queue full"))
    free = served()
    t0 = time.monotonic()
    gens = client([busy.base_url, free.base_url], concurrency=2).generate([Prompt(user=f"r{i}") for i in range(6)], P)
    assert all(g.error is None for g in gens) and time.monotonic() - t0 < 5
    assert busy.stats.requests <= 2 and free.stats.requests == 6  # benched for its Retry-After


def test_timeout_is_reported_per_prompt(served):
    h = served(faults=lambda n, body: Fault(status=None, delay=5) if "slow" in json.dumps(body) else None)
    t0 = time.monotonic()
    gens = client(h.base_url, timeout=0.5, max_retries=1).generate([Prompt(user="slow one"), Prompt(user="quick")], P)
    assert time.monotonic() - t0 < 4
    assert gens[0].text is None and gens[0].error.startswith("timeout (0.5s) after 1 retry")
    assert gens[1].error is None and gens[1].text


def test_other_4xx_fails_at_once_with_server_message(served):
    h = served(api_key="sekret")
    # check=False: the key is refused after the backend was made (the up-front check refuses it now)
    [g] = client(h.base_url, api_key="wrong", check=False).generate([Prompt(user="hi")], P)
    assert g.text is None and "HTTP 401" in g.error and "invalid or missing API key" in g.error
    assert g.extra["attempts"] == 1 and h.stats.requests == 1
    [ok] = client(h.base_url, api_key="sekret").generate([Prompt(user="hi")], P)
    assert ok.error is None


def test_malformed_replies_are_retried_or_reported(served):
    h = served(faults={1: Fault(200, body=b"<html>proxy error</html>"), 3: Fault(200, body=b'{"no": "choices"}')})
    [g] = client(h.base_url).generate([Prompt(user="a")], P)  # requests 1 (HTML) and 2 (good)
    assert g.error is None and g.extra["attempts"] == 2
    [bad] = client(h.base_url).generate([Prompt(user="b")], P)  # request 3: valid JSON, no choices
    assert bad.text is None and "malformed response" in bad.error


def test_dropped_connection_is_retried(served):
    h = served(faults={1: Fault(drop=True), 2: Fault(drop=True)})
    [g] = client(h.base_url).generate([Prompt(user="hi")], P)
    assert g.error is None and g.extra["attempts"] == 3
    assert list(h.stats.statuses) == [0, 0, 200]


def test_unreachable_server_is_an_error_not_an_exception():
    # check=False: the server goes away after the backend was made (the up-front check passed)
    [g] = client(dead_url(), max_retries=1, check=False).generate([Prompt(user="hi")], P)
    assert g.text is None and g.error.startswith("connection error after 1 retry")


# ---- several endpoints, concurrency ----------------------------------------------------------


def test_two_endpoints_share_traffic_and_fail_over(served):
    a, b = served(), served()
    be = client([a.base_url, b.base_url, dead_url()], concurrency=4)
    gens = be.generate([Prompt(user=f"row {i}") for i in range(24)], P)
    assert all(g.error is None for g in gens), [g.error for g in gens if g.error]
    assert a.stats.requests >= 6 and b.stats.requests >= 6, (a.stats.requests, b.stats.requests)
    b.stop()  # a replica dies mid-run: its kept-alive connections are cut too
    before = a.stats.requests
    gens = be.generate([Prompt(user=f"later {i}") for i in range(12)], P)
    assert all(g.error is None for g in gens), [g.error for g in gens if g.error]
    assert a.stats.requests - before == 12


def test_concurrency_bound_is_respected(served):
    h = served(faults=lambda n, body: Fault(status=None, delay=0.15))  # every reply is slow
    gens = client(h.base_url, concurrency=3).generate([Prompt(user=f"r{i}") for i in range(9)], P)
    assert all(g.error is None for g in gens)
    assert h.stats.max_in_flight == 3


def test_concurrent_generate_calls_share_the_bound(served):
    h = served(faults=lambda n, body: Fault(status=None, delay=0.1))
    be = client(h.base_url, concurrency=2)
    threads = [threading.Thread(target=be.generate, args=([Prompt(user=f"t{t}-{i}") for i in range(3)], P)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.stats.requests == 9 and h.stats.max_in_flight == 2


# ---- request body details ---------------------------------------------------------------------


def test_request_body_carries_params_and_prefix(served):
    bodies: list[dict] = []
    h = served(faults=lambda n, body: bodies.append(body))
    params = GenerationParams(max_new_tokens=17, temperature=0.7, top_p=0.9, seed=5, stop=("[END]",))
    [g] = client(h.base_url).generate([Prompt(user="u", system="s", assistant_prefix="Feedback:")], params)
    assert g.error is None
    b = bodies[0]
    assert (b["max_tokens"], b["temperature"], b["top_p"], b["seed"], b["stop"]) == (17, 0.7, 0.9, 5, ["[END]"])
    assert [m["role"] for m in b["messages"]] == ["system", "user", "assistant"]
    assert b["messages"][-1]["content"] == "Feedback:" and b["continue_final_message"] is True
    assert b["add_generation_prompt"] is False


def test_next_token_probs_reads_top_logprobs(served):
    bodies: list[dict] = []
    canned = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "logprobs": {"content": [
        {"token": "4", "logprob": -0.2, "top_logprobs": [
            {"token": "4", "logprob": -0.2}, {"token": " 5", "logprob": -2.0}, {"token": "x", "logprob": -3.0}]}]}}]}

    def fault(n, body):
        bodies.append(body)
        return Fault(200, body=json.dumps(canned).encode())

    h = served(faults=fault)
    [probs] = client(h.base_url).next_token_probs([Prompt(user="judge this")], ["Feedback: ok. [RESULT] "], list("12345"))
    assert probs["4"] == pytest.approx(0.8187, abs=1e-3) and probs["5"] == pytest.approx(0.1353, abs=1e-3)
    assert probs["1"] == 0.0
    assert bodies[0]["messages"][-1]["content"] == "Feedback: ok. [RESULT] " and bodies[0]["top_logprobs"] == 20


# ---- small units ------------------------------------------------------------------------------


def test_image_helpers(sample_images):
    png = sample_images["astronaut"].read_bytes()
    assert image_mime(png) == "image/png" and image_mime(b"\xff\xd8\xff\xe0xx") == "image/jpeg"
    url = image_data_url(ImageRef(path=str(sample_images["astronaut"])))
    assert base64.b64decode(url.split(",", 1)[1]) == png
    with pytest.raises(ValueError, match="allow_image_urls"):
        image_data_url(ImageRef(path="https://example.com/cat.png"))
    assert image_data_url(ImageRef(path="https://example.com/cat.png"), allow_urls=True).startswith("https://")


def test_missing_image_file_fails_that_prompt_only(served, tmp_path):
    h = served()
    gens = client(h.base_url).generate(
        [Prompt(user="a", images=(ImageRef(path=str(tmp_path / "gone.png")),)), Prompt(user="b")], P)
    assert gens[0].text is None and "request not sent" in gens[0].error and "gone.png" in gens[0].error
    assert gens[1].error is None


def test_retry_after_parsing_and_config_errors(monkeypatch):
    assert _retry_after("2.5") == 2.5 and _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="base_url"):
        get_backend("openai", model="x")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert OpenAIBackend("x", base_url="http://h/v1", check=False).api_key == "from-env"


def test_sick_endpoint_gets_little_traffic(served):
    """A replica that answers 500 to everything is benched, then probed one request at a time."""
    good = served(faults=lambda n, body: Fault(status=None, delay=0.05))  # busy but healthy
    sick = served(faults=lambda n, body: Fault(500, message="sick replica"))
    be = client([good.base_url, sick.base_url], concurrency=4, backoff=0.05, max_backoff=0.2)
    gens = be.generate([Prompt(user=f"row {i}") for i in range(40)], P)
    assert all(g.error is None for g in gens), [g.error for g in gens if g.error][:3]
    assert good.stats.requests == 40 and sick.stats.requests < 20, sick.stats.requests


def test_endpoint_back_from_the_bench_is_probed_one_request_at_a_time():
    be = OpenAIBackend("m", base_urls=["http://a/v1", "http://b/v1"], check=False)
    a, b = be.endpoints
    b.failures, b.benched_until = 3, 0.0  # failed before; bench time is over
    picks = [be._pick() for _ in range(4)]  # nothing finishes in between
    assert picks.count(b) == 1 and picks.count(a) == 3
    be._release(b)  # the probe succeeded: b is healthy again
    assert b.failures == 0 and be._pick() is b


def test_many_rows_through_flaky_replicas_keep_their_order(served):
    """Every 5th request dropped, every 7th a 500, on two replicas: each row still gets its own answer."""
    def flaky(n, body):
        return Fault(drop=True) if n % 5 == 0 else Fault(500) if n % 7 == 0 else None

    a, b = served(faults=flaky), served(faults=flaky)
    prompts = [Prompt(user=f"row {i}") for i in range(120)]
    gens = client([a.base_url, b.base_url], concurrency=8, max_retries=8, backoff=0.005).generate(prompts, P)
    want = MockBackend("mock").generate(prompts, P)
    assert [g.text for g in gens] == [w.text for w in want]
    assert any(g.extra["attempts"] > 1 for g in gens)


# ---- each image encoded once ------------------------------------------------------------------


def test_each_image_is_read_and_encoded_once_across_calls(served, sample_images, tmp_path):
    mock = MockBackend("mock")
    h = served(mock)
    jpeg = _jpeg_bytes(sample_images["rocket"])
    inline = ImageRef(data=jpeg)  # the data builder passes one such ref per image for all its calls
    png = tmp_path / "chelsea.png"
    png.write_bytes(sample_images["chelsea"].read_bytes())
    be = client(h.base_url)
    prompts = [Prompt(user=f"inline {i}", images=(inline,)) for i in range(9)]
    prompts += [Prompt(user=f"file {i}", images=(ImageRef(path=str(png)),)) for i in range(9)]
    assert all(g.error is None for g in be.generate(prompts, P))
    by_text = {c.user: c for c in mock.calls}
    assert all(by_text[f"inline {i}"].images[0].data == jpeg for i in range(9))
    assert all(by_text[f"file {i}"].images[0].data == png.read_bytes() for i in range(9))
    assert be.image_urls_made == 2


def test_a_replaced_image_file_is_sent_anew(served, sample_images, tmp_path):
    mock = MockBackend("mock")
    h = served(mock)
    f = tmp_path / "photo.png"
    f.write_bytes(sample_images["chelsea"].read_bytes())
    be = client(h.base_url)
    be.generate([Prompt(user="before", images=(ImageRef(path=str(f)),))], P)
    f.write_bytes(sample_images["coffee"].read_bytes())
    be.generate([Prompt(user="after", images=(ImageRef(path=str(f)),))], P)
    by_text = {c.user: c for c in mock.calls}
    assert by_text["before"].images[0].data == sample_images["chelsea"].read_bytes()
    assert by_text["after"].images[0].data == sample_images["coffee"].read_bytes()


def test_prompt_text_cannot_be_mistaken_for_an_image_slot(served, sample_images):
    mock = MockBackend("mock")
    h = served(mock)
    tricky = 'nul \x00 "quotes" \\ back\\slash \u2028 and {"type": "image_url"}'
    img = ImageRef(path=str(sample_images["astronaut"]))
    [g] = client(h.base_url).generate([Prompt(user=tricky, system=tricky, images=(img, img))], P)
    assert g.error is None
    [call] = mock.calls
    assert call.user == tricky and call.system == tricky
    assert [im.data for im in call.images] == [sample_images["astronaut"].read_bytes()] * 2
