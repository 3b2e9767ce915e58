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

from vlm_judge.backends.base import GenerationParams
from vlm_judge.backends.mock import MockBackend
from vlm_judge.serve import BadRequest, prompt_from_messages, start_server

REPO = Path(__file__).resolve().parents[1]


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
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
