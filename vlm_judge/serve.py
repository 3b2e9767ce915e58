"""A minimal OpenAI-compatible HTTP server in front of ANY vlm_judge backend.

`vlm-judge serve --judge PATH --backend hf` puts a local judge behind the same API that vLLM and
SGLang speak, so the `openai` backend (and the data builder's teacher client) can use it from
other processes or machines. For GPU-scale serving use vLLM or SGLang (docs/serving.md); this
server is for judges those engines cannot load, for CPU machines, and for tests.

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. Standard library only.
Concurrent requests that arrive within `batch_wait` seconds of each other (and any that queue
while the backend is busy) go to `backend.generate` together, up to `max_batch`: that is what makes
a batched local backend efficient behind an API that takes one prompt per request.
Tests inject faults (500, 429 with Retry-After, slow replies, malformed bodies) with `faults=`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import queue
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Union

from vlm_judge.backends.base import Backend, Generation, GenerationParams, Prompt
from vlm_judge.records import ImageRef

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request accepted; a few full-resolution images as base64 fit well below it."""
HISTORY = 100_000
"""How many batch sizes / reply statuses the stats keep (a long-running server must not grow)."""


class BadRequest(ValueError):
    """The request is not a chat completion this server can serve (answered with HTTP 400)."""


@dataclass(frozen=True)
class Fault:
    """What the server does instead of (or before) answering one request, for tests.

    `status=None` with a `delay` answers normally after sleeping (a slow server, or one that
    sleeps past the client's timeout); `body` replaces the JSON error body (malformed replies);
    `drop` closes the connection without any reply (a crashed worker or an impatient proxy).
    """

    status: int | None = 500
    retry_after: float | None = None
    delay: float = 0.0
    body: bytes | None = None
    message: str = "injected fault"
    drop: bool = False


FaultSpec = Union[Callable[[int, dict], Union[Fault, None]], Mapping[int, Fault], None]
"""Either {request number (1-based): Fault} or a function (number, request body) -> Fault | None."""


@dataclass
class ServerStats:
    """What the server saw, for tests and for `GET /health`."""

    requests: int = 0
    """Chat completion requests received (the number faults are keyed by)."""
    in_flight: int = 0
    max_in_flight: int = 0
    """The most chat requests being handled at the same moment."""
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=HISTORY))
    """Prompts per backend.generate call (the latest HISTORY calls)."""
    statuses: deque[int] = field(default_factory=lambda: deque(maxlen=HISTORY))
    """HTTP status of each chat reply, in the order they were sent (0: dropped, no reply)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


# ---- request <-> Prompt ------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content):
            raise BadRequest(f"{where}: only text content is supported here")
        return "\n".join(texts)
    raise BadRequest(f"{where}: content must be a string or a list of parts")


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL; anything else is refused (this server fetches nothing)."""
    if not url.startswith("data:"):
        raise BadRequest(f"image URLs are not fetched by this server; send a base64 data URL (got {url[:60]!r})")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise BadRequest("image data URL must be base64 encoded ('data:image/png;base64,...')")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"image data URL is not valid base64: {e}") from e


def prompt_from_messages(messages: Any) -> Prompt:
    """Map OpenAI chat messages to a Prompt: system text, ONE user turn (text + data-URL images),
    and an optional final assistant message, which becomes the assistant prefix to continue.

    Images are placed before the text, as every vlm_judge template expects; a judge prompt has
    one user turn, so multi-turn conversations are refused rather than silently flattened.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    system: list[str] = []
    user: str | None = None
    images: list[ImageRef] = []
    prefix = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, f"messages[{i}]"))
        elif role == "user":
            if user is not None:
                raise BadRequest("only one user message is supported (a judge prompt is a single turn)")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        texts.append(str(part.get("text", "")))
                    elif kind == "image_url":
                        iu = part.get("image_url")
                        url = iu.get("url") if isinstance(iu, dict) else iu
                        if not isinstance(url, str):
                            raise BadRequest(f"messages[{i}].content[{j}].image_url needs a url")
                        images.append(ImageRef(data=decode_data_url(url)))
                    else:
                        raise BadRequest(f"messages[{i}].content[{j}]: unsupported part type {kind!r}")
                user = "\n".join(texts)
            else:
                user = _text_of(content, f"messages[{i}]")
        elif role == "assistant":
            if i != len(messages) - 1 or user is None:
                raise BadRequest("an assistant message is only allowed last, as a prefix to continue")
            prefix = _text_of(content, f"messages[{i}]")
        else:
            raise BadRequest(f"messages[{i}]: unsupported role {role!r}")
    if user is None:
        raise BadRequest("no user message")
    return Prompt(user=user, system="\n".join(system) or None, images=tuple(images), assistant_prefix=prefix)


def params_from_body(body: dict) -> GenerationParams:
    """Sampling parameters from the request. Unlike OpenAI, temperature defaults to 0 (greedy):
    a judge should be reproducible unless asked otherwise."""
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this server")
    if body.get("n") not in (None, 1):
        raise BadRequest("n must be 1")
    stop = body.get("stop") or ()
    try:
        return GenerationParams(
            max_new_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or GenerationParams.max_new_tokens),
            temperature=float(body.get("temperature") if body.get("temperature") is not None else 0.0),
            top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
            seed=None if body.get("seed") is None else int(body["seed"]),
            stop=(stop,) if isinstance(stop, str) else tuple(str(s) for s in stop),
        )
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad sampling parameter: {e}") from e


def completion_json(gen: Generation, model: str) -> dict:
    """The OpenAI chat.completion object for one generation."""
    finish = gen.extra.get("finish_reason") or "stop"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        },
    }


# ---- micro-batching ----------------------------------------------------------------------


class _Item:
    __slots__ = ("prompt", "params", "done", "result")

    def __init__(self, prompt: Prompt, params: GenerationParams) -> None:
        self.prompt, self.params = prompt, params
        self.done = threading.Event()
        self.result: Generation | None = None


class MicroBatcher:
    """One worker thread owns the backend: it gathers queued requests into batches.

    A single worker also means a backend that is not thread-safe (a transformers model) is only
    ever called from one thread.
    """

    def __init__(self, backend: Backend, max_batch: int = 16, batch_wait: float = 0.005, stats: ServerStats | None = None) -> None:
        self.backend, self.max_batch, self.batch_wait = backend, max_batch, batch_wait
        self.stats = stats or ServerStats()
        self._q: queue.Queue[_Item | None] = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="vlm-judge-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt, params: GenerationParams) -> Generation:
        if self._stopped:
            return Generation(text=None, error="server stopped")
        item = _Item(prompt, params)
        self._q.put(item)
        item.done.wait()
        return item.result or Generation(text=None, error="server stopped")

    def stop(self) -> None:
        self._stopped = True
        self._q.put(None)
        self._thread.join(timeout=5)
        while True:  # anyone still waiting gets an answer instead of hanging
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.done.set()

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._q.put(None)  # stop after this batch
                    break
                batch.append(item)
            # one generate call per distinct sampling setting (they are per call, not per prompt);
            # greedy decoding ignores the seed, so clients sending different seeds still batch
            groups: dict[GenerationParams, list[_Item]] = {}
            for it in batch:
                key = it.params if it.params.temperature > 0 else replace(it.params, seed=None)
                groups.setdefault(key, []).append(it)
            for items in groups.values():
                params = items[0].params
                with self.stats.lock:
                    self.stats.batch_sizes.append(len(items))
                try:
                    gens = self.backend.generate([it.prompt for it in items], params)
                    if len(gens) != len(items):
                        raise RuntimeError(f"backend returned {len(gens)} generations for {len(items)} prompts")
                except Exception as e:  # the backend broke its contract; answer every waiter anyway
                    gens = [Generation(text=None, error=f"backend raised {type(e).__name__}: {e}")] * len(items)
                for it, g in zip(items, gens):
                    it.result = g
                    it.done.set()


# ---- HTTP --------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], backend: Backend, model_name: str, faults: FaultSpec,
                 api_key: str | None, max_batch: int, batch_wait: float) -> None:
        super().__init__(addr, _Handler)
        self.backend, self.model_name, self.faults, self.api_key = backend, model_name, faults, api_key
        self.stats = ServerStats()
        self.batcher = MicroBatcher(backend, max_batch, batch_wait, self.stats)
        self.stopping = threading.Event()
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()

    def fault_for(self, n: int, body: dict) -> Fault | None:
        if self.faults is None:
            return None
        if callable(self.faults):
            return self.faults(n, body)
        return self.faults.get(n)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    # headers and body go out in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per request)
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conns_lock:
                self.server.conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default; errors go in replies
        pass

    def _send(self, status: int, obj: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout)
            self.close_connection = True

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers=headers)

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok", "model": self.server.model_name})
        elif path in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "vlm-judge"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        srv = self.server
        with srv.stats.lock:
            srv.stats.requests += 1
            n = srv.stats.requests
            srv.stats.in_flight += 1
            srv.stats.max_in_flight = max(srv.stats.max_in_flight, srv.stats.in_flight)
        status = 500
        try:
            status = self._chat(n)
        except Exception as e:  # a bug here must still answer the client, not hang it
            self._error(500, f"server error: {type(e).__name__}: {e}", "server_error")
        finally:
            with srv.stats.lock:
                srv.stats.in_flight -= 1
                srv.stats.statuses.append(status)

    def _chat(self, n: int) -> int:
        srv = self.server
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, f"request body over {MAX_BODY_BYTES} bytes")
            return 413
        raw = self.rfile.read(length)
        if srv.api_key and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            self._error(401, "invalid or missing API key", "authentication_error")
            return 401
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
        except ValueError as e:
            self._error(400, f"request body is not valid JSON: {e}")
            return 400
        fault = srv.fault_for(n, body)
        if fault is not None:
            if fault.delay:
                srv.stopping.wait(fault.delay)
            if fault.drop:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return 0
            if fault.status is not None:
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                if fault.body is not None:
                    self._send(fault.status, raw=fault.body, headers=headers)
                else:
                    self._error(fault.status, f"{fault.message} (request {n})", "server_error", headers)
                return fault.status
        try:
            prompt = prompt_from_messages(body.get("messages"))
            params = params_from_body(body)
        except BadRequest as e:
            self._error(400, str(e))
            return 400
        gen = srv.batcher.submit(prompt, params)
        if gen.error is not None or gen.text is None:
            self._error(500, f"generation failed: {gen.error or 'no text'}", "server_error")
            return 500
        self._send(200, completion_json(gen, str(body.get("model") or srv.model_name)))
        return 200


@dataclass
class ServerHandle:
    """A running server: `base_url` is what the openai backend takes (ends in /v1)."""

    base_url: str
    stats: ServerStats
    _server: _Server
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop accepting, cut open keep-alive connections, and finish the batcher."""
        srv = self._server
        if srv.stopping.is_set():
            return
        srv.stopping.set()
        srv.shutdown()
        with srv.conns_lock:
            conns = list(srv.conns)
        for c in conns:  # without this a kept-alive client connection would still be served
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        srv.batcher.stop()
        srv.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FaultSpec = None,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    batch_wait: float = 0.005,
) -> ServerHandle:
    """Serve `backend` in a background thread; port 0 picks a free port. Returns at once."""
    if max_batch < 1 or batch_wait < 0:
        raise ValueError("max_batch must be >= 1 and batch_wait >= 0")
    srv = _Server((host, port), backend, model_name or getattr(backend, "name", "judge"), faults, api_key, max_batch, batch_wait)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="vlm-judge-serve", daemon=True)
    t.start()
    h, p = srv.server_address[:2]
    return ServerHandle(base_url=f"http://{h}:{p}/v1", stats=srv.stats, _server=srv, _thread=t)


# ---- CLI ---------------------------------------------------------------------------------


def _kv(s: str) -> tuple[str, Any]:
    k, sep, v = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return k, json.loads(v)
    except ValueError:
        return k, v


def main(argv: list[str] | None = None) -> int:
    """`vlm-judge serve --judge NAME_OR_PATH [--backend hf|mock] [--port N]`."""
    ap = argparse.ArgumentParser(prog="vlm-judge serve", description="Serve a judge over an OpenAI-compatible API.")
    ap.add_argument("--judge", required=True, help="judge folder, model path or name ('mock' for a test server)")
    ap.add_argument("--backend", default=None, help="backend to run it with (default: the judge card's, else hf)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="name clients pass as 'model' (default: --judge)")
    ap.add_argument("--max-batch", type=int, default=16, help="most prompts per backend call")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather a batch")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    ap.add_argument("--backend-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="extra backend option, repeatable (VALUE parsed as JSON when it can be)")
    args = ap.parse_args(argv)

    from vlm_judge.backends import get_backend

    backend_name = args.backend
    if backend_name is None:
        card = Path(args.judge) / "vlm_judge.json"
        backend_name = "mock" if args.judge == "mock" else (json.loads(card.read_text()).get("backend", "hf") if card.is_file() else "hf")
    try:
        from vlm_judge.presets import locate_judge

        # a preset name loads its local weights; a name that is nothing fails here, at once
        model = locate_judge(args.judge, backend_name).path
        backend = get_backend(backend_name, model=model, **dict(args.backend_arg))
    except (ImportError, OSError, ValueError) as e:
        print(f"vlm-judge serve: cannot load judge {args.judge!r} with backend {backend_name!r}: {e}", file=sys.stderr)
        return 1
    handle = start_server(backend, args.host, args.port, model_name=args.served_model_name or args.judge,
                          api_key=args.api_key, max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000)
    print(f"serving {args.judge!r} ({backend_name}) at {handle.base_url}  (model name {handle._server.model_name!r}; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
