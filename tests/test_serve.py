"""The OpenAI-compatible server (vlm_judge.serve): routes, request mapping, micro-batching, CLI,
and a real tiny LLaVA served over HTTP. Clients here are plain urllib, not our own backend."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vlm_judge.backends.base import GenerationParams, Prompt
from vlm_judge.backends.mock import MockBackend
from vlm_judge.serve import BadRequest, prompt_from_messages, start_server

REPO = Path(__file__).resolve().parents[1]


def post(url: str, body: dict | bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server():
    handles = []

    def start(backend=None, **kw):
        h = start_server(backend or MockBackend("mock"), **kw)
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()


def chat(text: str, **extra) -> dict:
    return {"model": "mock", "messages": [{"role": "user", "content": text}], **extra}


def test_routes_and_response_shape(server):
    h = server()
    root = h.base_url.removesuffix("/v1")
    assert get(root + "/health") == (200, {"status": "ok"})  # a bare liveness probe: no name, no path
    status, models = get(h.base_url + "/models")
    assert status == 200 and models["data"][0]["id"] == "mock"
    status, resp = post(h.base_url + "/chat/completions", chat("grade this"))
    assert status == 200 and resp["object"] == "chat.completion"
    assert "[RESULT]" in resp["choices"][0]["message"]["content"]
    assert resp["usage"]["total_tokens"] == resp["usage"]["prompt_tokens"] + resp["usage"]["completion_tokens"] > 0
    assert get(root + "/nope")[0] == 404


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (chat("x", stream=True), "streaming"),
    (chat("x", n=2), "n must be 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "one user message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "not fetched"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     "not valid base64"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_requests_get_400_with_reason(server, body, fragment):
    h = server()
    status, resp = post(h.base_url + "/chat/completions", body)
    assert status == 400 and fragment in resp["error"]["message"]


def test_messages_map_to_prompt(sample_images):
    png = sample_images["coffee"].read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    p = prompt_from_messages([
        {"role": "system", "content": "Be strict."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Grade."}]},
        {"role": "assistant", "content": "Feedback:"},
    ])
    assert (p.system, p.user, p.assistant_prefix) == ("Be strict.", "Grade.", "Feedback:")
    assert p.images[0].data == png
    with pytest.raises(BadRequest, match="assistant"):
        prompt_from_messages([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])


def test_sampling_params_reach_the_backend(server):
    seen: list[GenerationParams] = []

    class Recorder(MockBackend):
        def generate(self, prompts, params):
            seen.append(params)
            return super().generate(prompts, params)

    h = server(Recorder("mock"))
    status, _ = post(h.base_url + "/chat/completions",
                     chat("x", max_tokens=9, temperature=0.5, top_p=0.8, seed=3, stop="[END]"))
    assert status == 200
    assert seen[0] == GenerationParams(max_new_tokens=9, temperature=0.5, top_p=0.8, seed=3, stop=("[END]",))


def test_concurrent_requests_are_micro_batched(server):
    class Slow(MockBackend):
        def generate(self, prompts, params):
            time.sleep(0.2)  # while the backend works, the next requests queue up
            return super().generate(prompts, params)

    h = server(Slow("mock"), max_batch=4, batch_wait=0.05)
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        post(h.base_url + "/chat/completions", chat(f"row {i}", seed=i))[0])) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 10
    sizes = h.stats.batch_sizes
    # greedy requests batch together even with different seeds (the seed does not matter then)
    assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) <= 5, sizes


def test_backend_error_becomes_500_with_message(server):
    def script(prompt, _n):
        raise RuntimeError("out of memory")

    h = server(MockBackend("mock", script=script))
    status, resp = post(h.base_url + "/chat/completions", chat("x"))
    assert status == 500 and "out of memory" in resp["error"]["message"]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_cli_serves_a_judge_until_stopped():
    """`vlm-judge serve --judge mock --backend mock --port N` in its own process."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlm_judge.cli", "serve", "--judge", "mock", "--backend", "mock", "--port", str(port),
         "--served-model-name", "judge"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(100):
            try:
                if get(url.removesuffix("/v1") + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        from vlm_judge.scorer import Judge

        judge = Judge.load("judge", backend="openai", base_url=url)
        [j] = judge.absolute_grade("Describe.", "A cat.", rubric={
            "criteria": "Accurate?", "score1_description": "a", "score2_description": "b",
            "score3_description": "c", "score4_description": "d", "score5_description": "e"})
        assert j.status == "ok" and j.score in (1, 2, 3, 4, 5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert f"127.0.0.1:{port}/v1" in out


def test_serving_the_tiny_llava_over_http(server, request, sample_images):
    """A real transformers judge behind the server: same greedy text over HTTP as called directly."""
    try:
        import vlm_judge.backends.hf  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the hf backend (vlm_judge/backends/hf.py) is not importable: {e}")
    from vlm_judge.backends import get_backend

    tiny_llava_dir = request.getfixturevalue("tiny_llava_dir")  # built only when the test can run
    hf = get_backend("hf", model=str(tiny_llava_dir))
    from vlm_judge.backends.base import Prompt
    from vlm_judge.backends.openai import OpenAIBackend
    from vlm_judge.records import ImageRef

    # all three requests in one server batch, like the direct call (padding is then the same)
    h = server(hf, model_name="tiny", max_batch=3, batch_wait=0.5)
    prompts = [Prompt(user=f"Grade answer {i}.", images=(ImageRef(path=str(sample_images[n])),))
               for i, n in enumerate(["astronaut", "chelsea", "astronaut"])]
    params = GenerationParams(max_new_tokens=8)
    direct = [g.text for g in hf.generate(prompts, params)]
    remote = OpenAIBackend("tiny", base_url=h.base_url, concurrency=3).generate(prompts, params)
    assert [g.error for g in remote] == [None] * 3
    assert list(h.stats.batch_sizes) == [3]
    assert [g.text for g in remote] == direct
    assert all(g.prompt_tokens > 16 for g in remote)  # the 16 image tokens were counted


# ---- hostile and mistaken clients ---------------------------------------------------------

RUBRIC = {"criteria": "Accurate?", "score1_description": "a", "score2_description": "b",
          "score3_description": "c", "score4_description": "d", "score5_description": "e"}


class ContextMock(MockBackend):
    """The mock with a model context, like the hf backend reports it."""

    max_positions = 100
    max_token_chars = 4


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case, status, fragment", [
    ("top_p", 400, "top_p must be in"),
    ("nan_temperature", 400, "temperature must be a finite number"),
    ("huge_seed", 400, "seed must be in"),
    ("negative_max_tokens", 400, "max_tokens must be in"),
    ("context", 400, "over the model's context of 100 tokens"),
    ("max_tokens_over_context", 400, "does not fit the model's context of 100 tokens"),
    ("undecodable_image", 400, "cannot decode image"),
    ("strip_image", 400, "aspect ratio over the 20:1 limit"),
    ("logprobs", 400, "logprobs are not supported"),
    ("unknown_model", 404, "not found; this server serves 'mock'"),
])
def test_each_client_mistake_gets_its_4xx_and_exactly_one_request(server, case, status, fragment):
    from vlm_judge.backends.openai import OpenAIBackend
    from vlm_judge.records import ImageRef

    h = server(ContextMock("mock"))
    params, prompt, model, extra = GenerationParams(max_new_tokens=8), Prompt(user="grade"), "mock", {}
    if case == "top_p":
        params = GenerationParams(top_p=-0.5)
    elif case == "nan_temperature":
        params = GenerationParams(temperature=float("nan"))
    elif case == "huge_seed":
        params = GenerationParams(seed=2**70)
    elif case == "negative_max_tokens":
        params = GenerationParams(max_new_tokens=-3)
    elif case == "context":
        prompt = Prompt(user="word " * 200)  # 1000 characters: at least 250 tokens
    elif case == "max_tokens_over_context":
        params = GenerationParams(max_new_tokens=100)
    elif case == "undecodable_image":
        prompt = Prompt(user="grade", images=(ImageRef(data=b"\x89PNG\r\n\x1a\n not really"),))
    elif case == "strip_image":
        prompt = Prompt(user="grade", images=(ImageRef(data=_png(2000, 10)),))
    elif case == "logprobs":
        extra = {"logprobs": True}
    elif case == "unknown_model":
        model = "other"
    be = OpenAIBackend(model, base_url=h.base_url, backoff=0.01, extra_body=extra)
    [g] = be.generate([prompt], params)
    assert g.text is None and f"HTTP {status}" in g.error and fragment in g.error, g.error
    assert g.extra["attempts"] == 1 and h.stats.requests == 1 and list(h.stats.statuses) == [status]


def test_the_scorer_does_not_resend_a_client_error(server):
    from vlm_judge.scorer import Judge, ScorerConfig

    h = server()
    judge = Judge.load("someone-else", backend="openai", base_url=h.base_url, backoff=0.01,
                       config=ScorerConfig(max_parse_retries=2))
    [j] = judge.absolute_grade("Describe.", "A cat.", rubric=RUBRIC)
    assert j.status == "error" and "HTTP 404" in j.reason and j.attempts == 1
    assert h.stats.requests == 1  # not 3 (parse retries) x 5 (transport retries)


def test_an_unreachable_server_fails_at_once_with_one_line():
    from vlm_judge.options import ConfigError
    from vlm_judge.scorer import Judge

    url = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="no OpenAI-compatible server answers at http://127.0.0.1"):
        Judge.load("judge", backend="openai", base_url=url)
    assert time.monotonic() - t0 < 2


def test_a_refused_key_fails_at_once(server):
    from vlm_judge.backends.openai import OpenAIBackend
    from vlm_judge.options import ConfigError

    h = server(api_key="sekret")
    with pytest.raises(ConfigError, match="refused the API key"):
        OpenAIBackend("mock", base_url=h.base_url, api_key="wrong")
    assert h.stats.requests == 0


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.endswith(b"}"):
                    break
        except TimeoutError:
            pass
        return out


def _port(h) -> int:
    return int(h.base_url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.parametrize("length", [b"-1", b"abc"])
def test_a_bad_content_length_is_400_not_a_hang(server, length):
    h = server()
    t0 = time.monotonic()
    reply = _raw(_port(h), b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400") and time.monotonic() - t0 < 5


def test_body_limit_is_enforced_before_and_while_reading(server):
    h = server(max_body_bytes=1000)
    t0 = time.monotonic()
    # declared too large: refused from the header, without waiting for a body that never comes
    reply = _raw(_port(h), b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"1000-byte limit" in reply and time.monotonic() - t0 < 5
    # chunked (no length): cut while reading
    chunk = b"x" * 800
    body = b"320\r\n" + chunk + b"\r\n320\r\n" + chunk + b"\r\n0\r\n\r\n"
    reply = _raw(_port(h), b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 413")


def test_auth_key_is_checked_before_the_body_and_guards_every_route_but_health(server):
    h = server(api_key="sekret")
    root = h.base_url.removesuffix("/v1")
    t0 = time.monotonic()
    reply = _raw(_port(h), b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
                           b"Content-Length: 1000000\r\n\r\n")  # the body never comes
    assert reply.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 5
    assert get(root + "/health") == (200, {"status": "ok"})
    assert get(h.base_url + "/models")[0] == 401
    assert get(h.base_url + "/models/mock")[0] == 401
    for scheme in ("Bearer", "bearer", "BEARER"):
        status, resp = post(h.base_url + "/chat/completions", chat("x"), {"Authorization": f"{scheme} sekret"})
        assert status == 200, (scheme, resp)
    assert post(h.base_url + "/chat/completions", chat("x"), {"Authorization": "Basic sekret"})[0] == 401


def test_models_routes_name_only_the_served_model(server, tiny_text_lm_dir):
    h = server(MockBackend(str(tiny_text_lm_dir)))  # a backend named by a file path
    status, models = get(h.base_url + "/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [tiny_text_lm_dir.name]
    assert str(tiny_text_lm_dir.parent) not in json.dumps(models)
    assert get(h.base_url + f"/models/{tiny_text_lm_dir.name}")[0] == 200
    status, resp = get(h.base_url + "/models/nope")
    assert status == 404 and "not found" in resp["error"]["message"]


def test_unknown_route_reads_its_body_and_keeps_the_connection_usable(server):
    import http.client

    h = server()
    conn = http.client.HTTPConnection("127.0.0.1", _port(h), timeout=10)
    conn.request("POST", "/v1/nope", body=json.dumps(chat("x" * 5000)), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 404 and "no route" in json.loads(r.read())["error"]["message"]
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat("y")), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "chat.completion"
    conn.request("GET", "/v1/chat/completions")
    r = conn.getresponse()
    assert r.status == 405 and r.read()
    conn.close()


def test_finish_reason_says_length_when_cut(server):
    h = server()
    status, resp = post(h.base_url + "/chat/completions", chat("grade", max_tokens=3))
    assert status == 200 and resp["choices"][0]["finish_reason"] == "length"
    assert len(resp["choices"][0]["message"]["content"].split()) == 3
    status, resp = post(h.base_url + "/chat/completions", chat("grade"))
    assert resp["choices"][0]["finish_reason"] == "stop"


def test_a_strip_image_is_refused_from_its_header_in_under_a_second(server):
    png = _png(200000, 1)
    assert len(png) < 2000
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    h = server()
    body = {"model": "mock", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Grade."}]}]}
    t0 = time.monotonic()
    status, resp = post(h.base_url + "/chat/completions", body)
    assert status == 400 and "200000x1" in resp["error"]["message"]
    assert time.monotonic() - t0 < 1.0


def test_200_concurrent_clients_are_all_answered(server):
    """A burst of 200 clients: each gets a 200 or a 429 with Retry-After, none a reset."""
    import http.client

    class Slow(MockBackend):
        def generate(self, prompts, params):
            time.sleep(0.02)
            return super().generate(prompts, params)

    h = server(Slow("mock"), max_batch=8, max_queue=32)
    results: list = []
    lock = threading.Lock()
    start = threading.Barrier(200)

    def one(i: int) -> None:
        start.wait()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", _port(h), timeout=30)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(f"row {i}")),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            out = (r.status, r.getheader("Retry-After"))
            conn.close()
        except OSError as e:
            out = (type(e).__name__, None)
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 200
    bad = [r for r in results if not (r[0] == 200 or (r[0] == 429 and r[1] is not None))]
    assert not bad, bad[:5]
    assert sum(r[0] == 200 for r in results) >= 32


def test_half_open_connections_do_not_stop_a_normal_request(server):
    h = server(header_timeout=2.0)
    port = _port(h)
    t0 = time.monotonic()
    post(h.base_url + "/chat/completions", chat("warm"))
    normal = time.monotonic() - t0
    socks = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-")  # and never more
            socks.append(s)
        t0 = time.monotonic()
        status, _ = post(h.base_url + "/chat/completions", chat("normal"))
        took = time.monotonic() - t0
        assert status == 200 and took < max(1.0, 10 * normal), (took, normal)
        # the header deadline closes them: each half-open socket reads EOF
        time.sleep(2.5)
        socks[0].settimeout(5)
        socks[-1].settimeout(5)
        assert socks[0].recv(10) == b"" and socks[-1].recv(10) == b""
    finally:
        for s in socks:
            s.close()


def test_request_log_line_per_request(server):
    lines: list[str] = []
    h = server(log=lines.append)
    post(h.base_url + "/chat/completions", chat("x"))
    get(h.base_url + "/models/nope")
    deadline = time.monotonic() + 5
    while len(lines) < 2 and time.monotonic() < deadline:  # a line is written once its reply is sent
        time.sleep(0.01)
    assert lines[0].startswith("POST /v1/chat/completions 200 ") and lines[0].endswith("ms")
    assert lines[1].startswith("GET /v1/models/nope 404 ")


class _Spy:
    """Records what a row backend returned (cancelled rows included)."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.seen = backend, backend.name, []
        self.max_positions, self.max_token_chars = backend.max_positions, backend.max_token_chars

    def generate(self, prompts, params):
        return self.backend.generate(prompts, params)

    def generate_rows(self, prompts, params, budgets=None, on_done=None, cancelled=None):
        def done(i, g):
            self.seen.append((time.monotonic(), budgets[i], g))
            if on_done:
                on_done(i, g)

        return self.backend.generate_rows(prompts, params, budgets, done, cancelled)


@pytest.fixture(scope="module")
def long_lm(tiny_text_lm_dir):
    """The tiny text LM with end-of-sequence held off: a request runs its whole max_tokens."""
    from vlm_judge.backends import get_backend

    return get_backend("hf", model=str(tiny_text_lm_dir), min_new_tokens=4000)


def test_a_short_request_batched_with_a_long_one_is_answered_first(server, long_lm):
    spy = _Spy(long_lm)
    h = server(spy, model_name="lm", batch_wait=0.5)
    done: dict[str, tuple[float, dict]] = {}

    def ask(name: str, n: int) -> None:
        status, resp = post(h.base_url + "/chat/completions",
                            {"model": "lm", "messages": [{"role": "user", "content": f"{name} request"}], "max_tokens": n},
                            timeout=300)
        done[name] = (time.monotonic(), resp)

    long_t = threading.Thread(target=ask, args=("long", 60))
    long_t.start()
    time.sleep(0.05)
    ask("short", 2)
    assert long_t.is_alive()  # the short one is back while the long one still generates
    long_t.join(timeout=300)
    assert list(h.stats.batch_sizes) == [2]  # one batch, two budgets
    assert done["short"][0] < done["long"][0]
    assert done["short"][1]["usage"]["completion_tokens"] == 2
    assert done["long"][1]["usage"]["completion_tokens"] == 60
    assert {done[k][1]["choices"][0]["finish_reason"] for k in done} == {"length"}


def test_a_disconnected_clients_request_stops_generating(server, long_lm):
    spy = _Spy(long_lm)
    h = server(spy, model_name="lm")
    body = json.dumps({"model": "lm", "messages": [{"role": "user", "content": "long"}], "max_tokens": 3000}).encode()
    s = socket.create_connection(("127.0.0.1", _port(h)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 30
    while not h.stats.batch_sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    s.close()  # the client gives up
    deadline = time.monotonic() + 30
    while not spy.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    [(_, budget, g)] = spy.seen
    assert budget == 3000 and g.error == "cancelled" and g.completion_tokens < 3000
    assert h.stats.cancelled == 1
    status, _ = post(h.base_url + "/chat/completions",
                     {"model": "lm", "messages": [{"role": "user", "content": "next"}], "max_tokens": 2})
    assert status == 200


# ---- the command ---------------------------------------------------------------------------


def _serve_cli(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_judge.cli", "serve", "--judge", "mock", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_cli_busy_port_and_open_bind_without_key_give_one_line_each():
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _serve_cli("--host", "0.0.0.0", "--port", str(port))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert "WARNING: serving on 0.0.0.0 without an API key" in lines[0]
    assert lines[1].startswith(f"vlm-judge serve: cannot listen on 0.0.0.0:{port}:")


def _wait_up(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(f"http://127.0.0.1:{port}/health")
            return
        except OSError:
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["env", "file"])
def test_cli_takes_the_api_key_from_env_or_file(tmp_path, how):
    port = _free_port()
    key_file = tmp_path / "key"
    key_file.write_text("from-somewhere\n")
    args = ["--port", str(port)] + (["--api-key-file", str(key_file)] if how == "file" else [])
    env = {"VLM_JUDGE_API_KEY": "from-somewhere"} if how == "env" else {}
    proc = subprocess.Popen([sys.executable, "-m", "vlm_judge.cli", "serve", "--judge", "mock", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    try:
        _wait_up(port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert post(url, chat("x"))[0] == 401
        assert post(url, chat("x"), {"Authorization": "Bearer from-somewhere"})[0] == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert "from-somewhere" not in out + err
    assert "POST /v1/chat/completions 401" in err and "POST /v1/chat/completions 200" in err


def _png_variant(png: bytes, n: int) -> bytes:
    """The same pixels with a different tEXt chunk after IHDR: distinct bytes, distinct cache key."""
    import struct
    import zlib

    body = b"tEXt" + b"variant\x00" + str(n).encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


@pytest.mark.slow
def test_rss_after_50_huge_images_stays_under_the_cache_budget(tiny_llava_dir):
    """A server subprocess with the tiny LLaVA: 50 requests, each a distinct 7000x7000 PNG."""
    import io

    import psutil
    from PIL import Image

    from vlm_judge.images import IMAGE_CACHE_BYTES

    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (40, 90, 160)).save(buf, format="PNG")
    png = buf.getvalue()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlm_judge.cli", "serve", "--judge", str(tiny_llava_dir), "--backend", "hf",
                             "--port", str(port), "--served-model-name", "tiny", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_up(port, timeout=180)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def ask(data: bytes) -> int:
            u = "data:image/png;base64," + base64.b64encode(data).decode()
            return post(url, {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": u}}, {"type": "text", "text": "Grade."}]}]}, timeout=120)[0]

        assert ask(_png_variant(png, -1)) == 200
        ps = psutil.Process(proc.pid)
        base = ps.memory_info().rss
        statuses = [ask(_png_variant(png, i)) for i in range(50)]
        rss = ps.memory_info().rss
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert statuses == [200] * 50
    print(f"RSS after the first image {base / 2**20:.0f} MiB, after 50 more {rss / 2**20:.0f} MiB")
    # the old server kept every decoded original: 50 x 147 MB of RGB; now the growth is bounded by
    # the caches' budgets (preprocessed tensors, plus a quarter for decoded images), and is far lower
    assert rss - base < IMAGE_CACHE_BYTES * 1.25
    assert rss - base < 50 * 7000 * 7000 * 3 / 4


def test_context_is_checked_before_tokenizing_then_exactly(server, long_lm):
    """A 2 MB prompt is refused from its length alone; one under that bound but over the context
    after tokenizing is refused when encoded, also with a 400 naming the context."""
    import random

    h = server(long_lm, model_name="lm")
    url = h.base_url + "/chat/completions"
    t0 = time.monotonic()
    status, resp = post(url, {"model": "lm", "messages": [{"role": "user", "content": "a" * 2_000_000}]})
    assert status == 400 and "prompt has at least" in resp["error"]["message"] and time.monotonic() - t0 < 2
    assert "4096 tokens" in resp["error"]["message"]
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(12_000))
    status, resp = post(url, {"model": "lm", "max_tokens": 8, "messages": [{"role": "user", "content": text}]}, timeout=120)
    assert status == 400 and "over the model's 4096-token context" in resp["error"]["message"], resp


def test_score_against_an_unreachable_server_is_one_line_in_seconds(tmp_path):
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"instruction": "Describe.", "response": "A cat.", "rubric": RUBRIC}) + "\n")
    url = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vlm_judge.cli", "score", str(rows), "--judge", "judge", "--base-url", url,
                        "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and time.monotonic() - t0 < 20  # interpreter start included; was ~54 s of retries
    assert r.stderr.strip().splitlines() == [f"vlm-judge score: no OpenAI-compatible server answers at {url} "
                                             "(ConnectionRefusedError: [Errno 111] Connection refused)"]


def test_keep_alive_replies_do_not_wait_for_delayed_acks(server):
    """Headers and body go out in two writes: without TCP_NODELAY every reply waits ~40 ms for the
    client's delayed ACK. The median of sequential requests on one connection stays far below."""
    import http.client
    import statistics

    h = server(batch_wait=0.0)
    conn = http.client.HTTPConnection("127.0.0.1", _port(h), timeout=10)
    took = []
    for i in range(30):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(f"row {i}")),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        took.append(time.perf_counter() - t0)
    conn.close()
    assert statistics.median(took) < 0.03, took


def test_the_scorer_does_not_resend_a_request_the_backend_already_retried():
    """A server that drops every connection: the backend's own retries, then no parse retries."""
    from tests.fault_server import Fault
    from tests.fault_server import start_server as start_faulty
    from vlm_judge.scorer import Judge, ScorerConfig

    with start_faulty(MockBackend("mock"), faults=lambda n, body: Fault(drop=True)) as h:
        judge = Judge.load("mock", backend="openai", base_url=h.base_url, backoff=0.01, max_retries=1,
                           config=ScorerConfig(max_parse_retries=2))
        [j] = judge.absolute_grade("Describe.", "A cat.", rubric=RUBRIC)
    assert j.status == "error" and "connection error after 1 retry" in j.reason
    assert h.stats.requests == 2  # 1 + 1 retry, not x 3 parse attempts
