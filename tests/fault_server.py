"""Fault injection for tests: a layer around the real `vlm_judge.serve` application that answers
chosen requests with errors, slow replies, malformed bodies or a dropped connection.

`start_server(backend, faults=..., **kw)` is `vlm_judge.serve.start_server` with that layer
inside; the shipped server carries no test hooks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from vlm_judge.backends.base import Backend
from vlm_judge.serve import ServerHandle
from vlm_judge.serve import start_server as _start_server


@dataclass(frozen=True)
class Fault:
    """What the server does instead of (or before) answering one request.

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

CHAT = ("/v1/chat/completions", "/chat/completions")


def fault_layer(faults: FaultSpec) -> Callable[[Any], Any]:
    """An ASGI wrapper applying `faults` to chat requests, numbered 1, 2, ... as they arrive."""

    def wrap(app: Any) -> Any:
        count = 0

        async def layer(scope: dict, receive: Any, send: Any) -> None:
            nonlocal count
            if faults is None or scope["type"] != "http" or scope["path"].rstrip("/") not in CHAT:
                await app(scope, receive, send)
                return
            count += 1
            n = count
            chunks = []
            while True:  # read the body to hand it to the spec, then replay it to the app
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            raw = b"".join(chunks)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            fault = faults(n, body) if callable(faults) else faults.get(n)
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                return await receive()

            if fault is None:
                await app(scope, replay, send)
                return
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                scope["vlm_judge.transport"].close()
                await receive()  # returns once the connection is gone
                return
            if fault.status is None:
                await app(scope, replay, send)
                return
            headers = [(b"content-type", b"application/json")]
            if fault.retry_after is not None:
                headers.append((b"retry-after", f"{fault.retry_after:g}".encode()))
            data = fault.body if fault.body is not None else json.dumps(
                {"error": {"message": f"{fault.message} (request {n})", "type": "server_error", "code": fault.status}}).encode()
            headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": fault.status, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        return layer

    return wrap


def start_server(backend: Backend, faults: FaultSpec = None, **kw: Any) -> ServerHandle:
    """`vlm_judge.serve.start_server` with `faults` injected (see Fault)."""
    return _start_server(backend, wrap=fault_layer(faults) if faults is not None else None, **kw)
