"""An OpenAI-compatible HTTP server in front of ANY vlm_judge backend (uvicorn + starlette).

`vlm-judge serve --judge PATH --backend hf` puts a local judge behind the same API that vLLM and
SGLang speak, so the `openai` backend (and the data builder's teacher client) can use it from
other processes or machines. For GPU-scale serving use vLLM or SGLang (docs/serving.md); this
server is for judges those engines cannot load, for CPU machines, and for tests.

Routes: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id} (all behind the API key
when one is set) and GET /health (a bare liveness probe: {"status": "ok"}, nothing else).
Requests go through the micro-batcher (vlm_judge.serve_batcher). What protects the server from
its clients, in the order a request meets it:

- the listen backlog (`BACKLOG`) holds bursts of connections instead of resetting them;
- a connection must send its request headers within `header_timeout` seconds and an idle
  keep-alive connection is closed after `keep_alive` seconds, so half-open connections cost a
  file descriptor for a bounded time and no thread at all;
- the API key is checked before the body is read (401), the body size from Content-Length
  before reading (413) and again while reading (a chunked body), within `body_timeout` (408);
- every field is validated (400 naming the field and the limit, 404 for an unknown model), the
  images from their headers, and the token budget against the context before any tokenizing;
- a full queue answers 429 with Retry-After; a client that disconnects stops its request.

Needs the `serve` extra: pip install 'vlm-judge[serve]'.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_judge.backends.base import Backend
from vlm_judge.images import DEFAULT_MAX_PIXELS
from vlm_judge.judge_options import JudgeOptions, add_judge_options
from vlm_judge.serve_api import (
    ApiError,
    BadRequest,
    check_context,
    completion_json,
    decode_data_url,
    model_json,
    params_from_body,
    prompt_from_messages,
)
from vlm_judge.serve_batcher import CLIENT_ERROR, MicroBatcher, QueueFull, ServerStats

__all__ = ["BadRequest", "ServerHandle", "ServerStats", "build_app", "decode_data_url", "main",
           "prompt_from_messages", "start_server"]

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest request accepted; a few full-resolution images as base64 fit well below it."""
BACKLOG = 2048
"""Listen backlog: with the default of a few dozen, a burst of clients gets connection resets."""
API_KEY_ENV = "VLM_JUDGE_API_KEY"

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def _need_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"vlm-judge serve needs uvicorn and starlette: pip install 'vlm-judge[serve]' ({e})") from e


# ---- the application ---------------------------------------------------------------------


@dataclass
class ServeConfig:
    """What the application enforces per request."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout: float = 30.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_after: int = 1
    """Seconds a client refused with 429 (queue full) is told to wait."""


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status, headers=headers)


class App:
    """The ASGI application: routing, auth, limits, the request -> batcher -> reply path."""

    def __init__(self, backend: Backend, cfg: ServeConfig, batcher: MicroBatcher, stats: ServerStats) -> None:
        self.backend, self.cfg, self.batcher, self.stats = backend, cfg, batcher, stats
        self.context = getattr(backend, "max_positions", None)
        self.token_chars = getattr(backend, "max_token_chars", None) if self.context else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan off and no websockets
            return
        from starlette.requests import Request

        request = Request(scope, receive)
        try:
            response = await self._route(request)
        except ApiError as e:
            response = _json(e.status, e.body(), e.headers)
        except Exception as e:  # a bug here must still answer the client, with a line in the log
            traceback.print_exc(file=sys.stderr)
            response = _json(500, {"error": {"message": f"server error: {type(e).__name__}", "type": "server_error",
                                             "code": 500}})
        await response(scope, receive, send)

    def _authorize(self, request: Any) -> None:
        key = self.cfg.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key", "authentication_error", {"WWW-Authenticate": "Bearer"})

    async def _route(self, request: Any) -> Any:
        method, path = request.method, request.url.path.rstrip("/") or "/"
        if path == "/health" and method in ("GET", "HEAD"):
            return _json(200, {"status": "ok"})
        self._authorize(request)
        name = self.cfg.model_name
        if path in ("/v1/models", "/models") and method == "GET":
            return _json(200, {"object": "list", "data": [model_json(name)]})
        for prefix in ("/v1/models/", "/models/"):
            if path.startswith(prefix) and method == "GET":
                if path[len(prefix):] != name:
                    raise ApiError(404, f"model {path[len(prefix):]!r} not found; this server serves {name!r}",
                                   "not_found_error")
                return _json(200, model_json(name))
        if path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                raise ApiError(405, f"{method} {path}: use POST", headers={"Allow": "POST"})
            return await self._chat(request)
        raise ApiError(404, f"no route {method} {path}", "not_found_error")

    async def _body(self, request: Any) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise BadRequest(f"Content-Length {declared!r} is not a number of bytes")
            if int(declared) > limit:
                raise ApiError(413, f"request body of {int(declared)} bytes is over the {limit}-byte limit",
                               headers={"Connection": "close"})

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body over the {limit}-byte limit", headers={"Connection": "close"})
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.cfg.body_timeout)
        except asyncio.TimeoutError as e:
            raise ApiError(408, f"request body not received within {self.cfg.body_timeout:g}s",
                           headers={"Connection": "close"}) from e

    async def _chat(self, request: Any) -> Any:
        raw = await self._body(request)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.cfg.model_name:
            raise ApiError(404, f"model {str(model)[:100]!r} not found; this server serves {self.cfg.model_name!r}",
                           "not_found_error")
        prompt = prompt_from_messages(body.get("messages"), self.cfg.max_pixels)
        params = params_from_body(body)
        check_context(prompt, params, self.context, self.token_chars)
        try:
            job = self.batcher.submit(prompt, params, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, "the server's queue is full; retry later", "rate_limit_error",
                           {"Retry-After": str(self.cfg.retry_after)}) from e
        gen = await self._wait(job, request)
        if gen is None:  # the client left; nobody reads a reply
            return _json(499, {"error": {"message": "client disconnected", "type": "cancelled", "code": 499}})
        if gen.error is not None or gen.text is None:
            if gen.extra.get(CLIENT_ERROR):
                raise BadRequest(gen.error or "bad request")
            raise ApiError(500, f"generation failed: {gen.error or 'no text'}", "server_error")
        return _json(200, completion_json(gen, self.cfg.model_name))

    async def _wait(self, job: Any, request: Any) -> Any:
        """The job's generation, or None when the client disconnects first (the job is cancelled)."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if job.future in done:
            return job.future.result()
        self.batcher.cancel(job)
        return None


class Observed:
    """Outermost layer: request counting, reply statuses, and one log line per request
    (method, path, status, milliseconds to the reply's headers; '-' when none was sent)."""

    CHAT = ("/v1/chat/completions", "/chat/completions")

    def __init__(self, app: ASGIApp, stats: ServerStats, log: Callable[[str], None] | None) -> None:
        self.app, self.stats, self.log = app, stats, log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        chat = scope["path"].rstrip("/") in self.CHAT
        status = 0

        async def send_seen(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if chat:  # booked before the client can read the reply
                    with self.stats.lock:
                        self.stats.in_flight -= 1
                    self.stats.record(self.stats.statuses, status)
                line()  # so is the log line: the reply's body follows at once
            await send(msg)

        def line() -> None:
            if self.log is not None:
                self.log(f"{scope['method']} {scope['path']} {status or '-'} {1000 * (time.perf_counter() - t0):.0f}ms")

        if chat:
            with self.stats.lock:
                self.stats.requests += 1
                self.stats.in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            await self.app(scope, receive, send_seen)
        finally:
            if not status:  # no reply at all (a dropped connection)
                if chat:
                    with self.stats.lock:
                        self.stats.in_flight -= 1
                    self.stats.record(self.stats.statuses, 0)
                line()


def build_app(backend: Backend, cfg: ServeConfig, batcher: MicroBatcher, stats: ServerStats,
              wrap: Callable[[ASGIApp], ASGIApp] | None = None, log: Callable[[str], None] | None = None) -> ASGIApp:
    """The full ASGI stack; `wrap` puts a layer (e.g. tests' fault injection) inside the observer."""
    inner: ASGIApp = App(backend, cfg, batcher, stats)
    if wrap is not None:
        inner = wrap(inner)
    return Observed(inner, stats, log)


# ---- the HTTP server ---------------------------------------------------------------------


def _protocol_class(header_timeout: float) -> type:
    """uvicorn's h11 protocol plus a deadline for the request headers.

    uvicorn's keep-alive timer runs only between requests and is cancelled by the first byte of
    the next one, so a connection that sends part of its headers and stops would be held forever.
    Each connection also carries its transport in the scope (`vlm_judge.transport`), which lets a
    test layer drop a connection without a reply."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # headers and body go out in separate writes; with Nagle on, the body waits for
                # the client's delayed ACK (~40 ms per request)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            app = self.app

            async def with_transport(scope: dict, receive: Any, send: Any) -> None:
                scope["vlm_judge.transport"] = transport
                await app(scope, receive, send)

            self.app = with_transport
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline)

        def _header_deadline(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.conn.their_state in (h11.IDLE, h11.DONE) and not self.transport.is_closing():
                self.transport.close()  # headers not complete in time (or a request never came)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so a busy port is an OSError the caller can word)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family = infos[0][0] if infos else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4] if infos else (host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerHandle:
    """A running server: `base_url` is what the openai backend takes (ends in /v1)."""

    base_url: str
    stats: ServerStats
    model_name: str
    _server: Any
    _thread: threading.Thread
    _batcher: MicroBatcher

    def stop(self) -> None:
        """Stop accepting, close connections (in-flight ones get up to a second), end the batcher."""
        if self._server.should_exit and not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._batcher.stop()
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    batch_wait: float = 0.005,
    max_queue: int = 256,
    max_body_bytes: int = MAX_BODY_BYTES,
    header_timeout: float = 10.0,
    keep_alive: int = 5,
    body_timeout: float = 30.0,
    wrap: Callable[[ASGIApp], ASGIApp] | None = None,
    log: Callable[[str], None] | None = None,
) -> ServerHandle:
    """Serve `backend` in a background thread; port 0 picks a free port. Returns once it listens.

    `model_name`: the name clients must send as 'model' (default: the last part of the backend's
    name, never a full path). `log`: called with one line per request (e.g. `print` to stderr).
    Raises OSError when the address cannot be bound (e.g. the port is busy).
    """
    _need_serve_extra()
    import uvicorn

    name = model_name or Path(str(getattr(backend, "name", "judge"))).name or "judge"
    stats = ServerStats()
    batcher = MicroBatcher(backend, max_batch, batch_wait, max_queue, stats)
    cfg = ServeConfig(model_name=name, api_key=api_key or None, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    app = build_app(backend, cfg, batcher, stats, wrap, log)
    try:
        sock = _bind(host, port)
    except OSError:
        batcher.stop()
        raise
    config = uvicorn.Config(app, http=_protocol_class(header_timeout), loop="asyncio", lifespan="off",
                            log_config=None, log_level="warning", access_log=False, backlog=BACKLOG,
                            timeout_keep_alive=keep_alive, timeout_graceful_shutdown=1, server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlm-judge-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    h, p = sock.getsockname()[:2]
    url_host = f"[{h}]" if ":" in h else h
    return ServerHandle(f"http://{url_host}:{p}/v1", stats, name, server, thread, batcher)


# ---- CLI ---------------------------------------------------------------------------------


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $VLM_JUDGE_API_KEY (a flag is visible in `ps`)."""
    if args.api_key:
        return args.api_key
    if args.api_key_file:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`vlm-judge serve --judge NAME_OR_PATH [--backend hf|mock] [--port N]`."""
    ap = argparse.ArgumentParser(prog="vlm-judge serve", description="Serve a judge over an OpenAI-compatible API.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--judge", required=True, help="judge folder, preset, model path or name ('mock' for a test server)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind; another than loopback serves other machines: set a key and put TLS in front")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None,
                    help="name clients pass as 'model' (default: the last part of --judge)")
    ap.add_argument("--max-batch", type=int, default=16, help="most prompts per backend call")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather a batch")
    ap.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 429 + Retry-After")
    ap.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body")
    ap.add_argument("--api-key", default=None,
                    help=f"require 'Authorization: Bearer KEY' (visible in the process list: prefer ${API_KEY_ENV} "
                         "or --api-key-file)")
    ap.add_argument("--api-key-file", default=None, help="read the API key from this file")
    ap.add_argument("--quiet", action="store_true", help="no request log lines on stderr")
    # the judge options every command shares; a server takes generation settings from each request
    add_judge_options(ap, generation=False, template=False)
    args = ap.parse_args(argv)

    from vlm_judge.backends import get_backend
    from vlm_judge.options import ConfigError
    from vlm_judge.presets import locate_judge

    try:
        _need_serve_extra()
        api_key = _api_key(args)
        opts = JudgeOptions.from_args(args)
    except (ImportError, OSError, ValueError, ConfigError) as e:
        print(f"vlm-judge serve: {e}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not api_key:
        print(f"vlm-judge serve: WARNING: serving on {args.host} without an API key: anyone who can reach this "
              f"port can use the judge (set ${API_KEY_ENV} or --api-key-file, and put TLS in front)",
              file=sys.stderr)
    urls = opts.urls_for(args.judge)
    backend_name = opts.backend_for(args.judge, urls)
    try:
        # a preset name loads its local weights; a name that is nothing fails here, at once
        model = locate_judge(args.judge, backend_name, served=bool(urls)).path
        backend = get_backend(backend_name, model=model, **opts.backend_kwargs(urls))
    except (ImportError, OSError, ValueError) as e:
        print(f"vlm-judge serve: cannot load judge {args.judge!r} with backend {backend_name!r}: {e}", file=sys.stderr)
        return 1
    try:
        handle = start_server(backend, args.host, args.port, model_name=args.served_model_name or Path(args.judge).name,
                              api_key=api_key, max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000,
                              max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20),
                              log=None if args.quiet else _stderr)
    except OSError as e:
        print(f"vlm-judge serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"vlm-judge serve: {e}", file=sys.stderr)
        return 2
    print(f"serving {handle.model_name!r} ({backend_name}) at {handle.base_url}"
          f"{' (API key required)' if api_key else ''}; Ctrl-C stops", flush=True)
    try:
        while handle._thread.is_alive():
            handle._thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
