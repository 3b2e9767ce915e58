"""The `openai` backend: any OpenAI-compatible chat server (vLLM, SGLang, Ollama, a hosted API).

Standard library only (http.client + threads) so the core stays import-light. What it adds over
a bare HTTP call, because judging runs tens of thousands of requests against servers that fail:

- bounded concurrency (a thread pool shared by every `generate` call of this backend);
- one check of the server when the backend is made (GET /models): a server that does not answer
  or refuses the key fails at once with one line (`ConfigError`), not after every row's retries;
- retries with exponential backoff and jitter on 408, 429, 5xx, connection errors and timeouts,
  honouring `Retry-After`; any other 4xx (400, 401, 404, 413, ...) fails that prompt at once with
  the server's message, and is marked so that the scorer's parse-retry loop does not send it again;
- several endpoints (`base_urls`, e.g. vLLM replicas) with least-outstanding-requests balancing
  and failover: an endpoint that fails is benched for a while and its requests go elsewhere;
- a failed prompt becomes `Generation(text=None, error=...)`; one bad prompt never raises.

Images travel as base64 data URLs (never fetched from the web unless `allow_image_urls`). Each
image's URL is made once and kept (bounded by `image_url_cache_bytes`, default 256 MiB, least
recently used forgotten) and spliced into each request body as bytes, so a run that sends one image
many times (five responses per image, nine data-builder calls per image) reads, encodes and JSON-
escapes it once; a file is checked by size and mtime on each use, so a replaced file is sent anew.
`Prompt.assistant_prefix` is sent as a final assistant message with vLLM's
`continue_final_message` (see `prefix_mode`); the returned text is the continuation only.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import mimetypes
import os
import random
import secrets
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from vlm_judge.backends.base import Generation, GenerationParams, Prompt
from vlm_judge.images import ByteCache
from vlm_judge.options import ConfigError
from vlm_judge.records import ImageRef
from vlm_judge.redact import redact_url

CHECK_TIMEOUT = 10.0
"""Seconds the up-front server check waits for each endpoint (at most the request timeout)."""

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_mime(data: bytes, path: str | None = None) -> str:
    """The MIME type of encoded image bytes, from their magic number (the file name may lie)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    guessed = mimetypes.guess_type(path or "")[0]
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def image_data_url(ref: ImageRef, allow_urls: bool = False) -> str:
    """A `data:` URL holding the image file's bytes unchanged (the server decodes them)."""
    if ref.path is not None and ref.path.startswith(("http://", "https://")):
        if not allow_urls:
            raise ValueError(f"image URL {ref.path} is not sent unless allow_image_urls=True")
        return ref.path
    if ref.data is not None:
        data = ref.data
    else:
        with open(ref.path, "rb") as f:  # type: ignore[arg-type]
            data = f.read()
    return f"data:{image_mime(data, ref.path)};base64,{base64.b64encode(data).decode('ascii')}"


class _DataURLs:
    """Each image's data URL, made once and kept as ASCII bytes (a base64 data URL needs no JSON
    escaping, so it is spliced into the request body as it is).

    An inline image is known by its bytes object (the cache entry holds it, so its id cannot be
    reused while the entry lives); a file by its path, size and mtime. Bounded: `budget_bytes` of
    URLs and the inline bytes they hold, least recently used forgotten."""

    def __init__(self, budget_bytes: int, allow_urls: bool) -> None:
        self.cache = ByteCache(budget_bytes)
        self.allow_urls = allow_urls
        self.made = 0
        """URLs made so far (a run that sends each image many times makes one per image)."""
        self._lock = threading.Lock()

    def get(self, ref: ImageRef) -> bytes | str:
        """The image's data URL as ASCII bytes, or a web URL as text (sent as given)."""
        if ref.path is not None and ref.path.startswith(("http://", "https://")):
            # a web URL, as text: it may need JSON escaping, so it goes through json.dumps
            return image_data_url(ref, self.allow_urls)
        if ref.data is not None:
            key: tuple = ("data", id(ref.data), len(ref.data))
        else:
            st = os.stat(ref.path)  # type: ignore[arg-type]
            key = ("path", ref.path, st.st_size, st.st_mtime_ns)
        # one lock around the making too: calls that start together on one image make it once
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None and (ref.data is None or hit[0] is ref.data):
                return hit[1]
            url = image_data_url(ref, self.allow_urls).encode("ascii")
            self.made += 1
            self.cache.put(key, (ref.data, url), len(url) + len(ref.data or b""))
            return url


class _Retryable(Exception):
    """A failure worth another try: 429, 5xx, connection error, timeout."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None, endpoint_fault: bool = True) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # e.g. "HTTP 500", "timeout (120s)": the head of the final error message
        self.detail = detail
        self.retry_after = retry_after
        self.endpoint_fault = endpoint_fault  # False for 429: the endpoint is alive, just busy


class _Fatal(Exception):
    """A failure another try cannot fix (e.g. 400 bad request, 401, 404 unknown model)."""


@dataclass
class _Endpoint:
    url: str
    label: str = ""
    """The URL as messages and outputs name it: scheme://host:port/path, no credentials or query."""

    def __post_init__(self) -> None:
        self.label = self.label or redact_url(self.url)
    outstanding: int = 0
    failures: int = 0
    benched_until: float = 0.0
    sent: int = 0


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _server_message(body: bytes) -> str:
    """The error message from an OpenAI-style error body, or the body itself, shortened."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err)
        elif isinstance(err, str):
            text = err
    except ValueError:
        pass
    return text.strip()[:500]


class OpenAIBackend:
    """Generates through an OpenAI-compatible `/chat/completions` endpoint (or several).

    `model` is the name the server knows the judge by (vLLM's `--served-model-name`).
    `prefix_mode`: how `Prompt.assistant_prefix` is sent: "continue" (default) adds a final
    assistant message and vLLM/SGLang's `continue_final_message=true, add_generation_prompt=false`;
    "message" adds the assistant message only (servers that continue a trailing assistant turn on
    their own, e.g. Anthropic-style); "refuse" fails such prompts (hosted APIs that reject both).
    `extra_body` is merged into every request (e.g. {"top_k": 1} or vLLM's guided decoding).
    `image_url_cache_bytes`: budget of the kept image data URLs (see the module docstring).
    `check`: ask each endpoint for GET /models once, now, and raise ConfigError when none answers
    or one refuses the API key (False: a server that is started later, or tests of the retries).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        base_urls: Sequence[str] | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 300.0,
        allow_image_urls: bool = False,
        prefix_mode: Literal["continue", "message", "refuse"] = "continue",
        extra_body: dict[str, Any] | None = None,
        image_url_cache_bytes: int = 256 << 20,
        check: bool = True,
        **_: Any,
    ) -> None:
        urls = list(base_urls or []) + ([base_url] if base_url else [])
        if not urls and os.environ.get("OPENAI_BASE_URL"):
            urls = [os.environ["OPENAI_BASE_URL"]]
        if not urls:
            raise ValueError("the openai backend needs base_url=... (or base_urls, or OPENAI_BASE_URL)")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        if prefix_mode not in ("continue", "message", "refuse"):
            raise ValueError("prefix_mode must be 'continue', 'message' or 'refuse'")
        self.name = model
        self.model = model
        self.endpoints = [_Endpoint(u.rstrip("/")) for u in dict.fromkeys(urls)]
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.concurrency = concurrency
        # SchedulesItself: one pool of `concurrency` requests shared by every generate call
        self.max_in_flight = self.concurrent_calls = concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.allow_image_urls = allow_image_urls
        self.prefix_mode = prefix_mode
        self.extra_body = dict(extra_body or {})
        self._urls = _DataURLs(image_url_cache_bytes, allow_image_urls)
        # where an image's URL goes in the dumped JSON: a string no prompt text can equal by chance
        self._slot = f"\x00image-{secrets.token_hex(8)}\x00"
        self._slot_json = json.dumps(self._slot).encode()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # per-thread keep-alive connections, one per endpoint
        if check:
            self.check()

    def check(self) -> None:
        """GET /models on each endpoint: raise ConfigError (one line) when no endpoint answers at
        all, or when one answers 401/403 (a wrong key fails every row the same way). Any other
        answer (200, 404 from a server without the route, 5xx while warming up) counts as alive."""
        down = []
        for ep in self.endpoints:
            u = urllib.parse.urlsplit(ep.url)
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = cls(u.hostname or "localhost", u.port, timeout=min(self.timeout, CHECK_TIMEOUT))
            try:
                conn.request("GET", (u.path or "") + "/models", headers={"Authorization": f"Bearer {self.api_key}"})
                r = conn.getresponse()
                status, data = r.status, r.read()
            except (OSError, http.client.HTTPException) as e:
                down.append(f"{ep.label} ({type(e).__name__}: {e})")
                continue
            finally:
                conn.close()
            if status in (401, 403):
                raise ConfigError(f"the server at {ep.label} refused the API key (HTTP {status}: {_server_message(data)}); "
                                  "set OPENAI_API_KEY or api_key=")
        if len(down) == len(self.endpoints):
            raise ConfigError(f"no OpenAI-compatible server answers at {'; '.join(down)}")

    # ---- public API -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One Generation per prompt, in order; requests run concurrently up to `concurrency`."""
        pool = self._executor()
        futures = [pool.submit(self._one, p, params) for p in prompts]
        return [f.result() for f in futures]

    def next_token_probs(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], candidates: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(next token == candidate) after prompt + continuation, from the server's top_logprobs.

        Needs a server that continues a final assistant message (vLLM, SGLang) and returns
        `logprobs`. Tokens are matched after stripping spaces (" 4" and "4" both count for "4");
        a candidate outside the top 20 gets 0. Raises on a failed request (no partial answers).
        """
        params = GenerationParams(max_new_tokens=1, temperature=0.0, seed=0)
        body_extra = {"logprobs": True, "top_logprobs": 20}
        pool = self._executor()
        futures = [
            pool.submit(self._request_with_retries, self._payload(Prompt(
                user=p.user, system=p.system, images=p.images, assistant_prefix=p.assistant_prefix + c,
            ), params, body_extra))
            for p, c in zip(prompts, continuations)
        ]
        out = []
        for f in futures:
            resp, _, _ = f.result()
            if isinstance(resp, Exception):
                raise RuntimeError(f"next_token_probs request failed: {resp}")
            try:
                top = resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError) as e:
                raise RuntimeError("the server returned no top_logprobs (does it support logprobs?)") from e
            probs = dict.fromkeys(candidates, 0.0)
            for item in top:
                tok = str(item.get("token", "")).strip()
                if tok in probs:
                    probs[tok] += math.exp(float(item["logprob"]))
            out.append(probs)
        return out

    def close(self) -> None:
        """Stop the worker threads (the backend can still be used; they restart on demand)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # ---- request building -------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="vlm-judge-openai")
            return self._pool

    @property
    def image_urls_made(self) -> int:
        """Image data URLs made so far (one per distinct image while the cache holds it)."""
        return self._urls.made

    def _payload(self, prompt: Prompt, params: GenerationParams, extra: dict[str, Any] | None = None) -> bytes:
        """The request body as JSON bytes, each image's kept data URL spliced in where its slot is."""
        urls = [self._urls.get(im) for im in prompt.images]
        raw = json.dumps(self._body(prompt, params, urls, extra)).encode()
        spliced = [u for u in urls if isinstance(u, bytes)]
        if not spliced:
            return raw
        pieces = raw.split(self._slot_json)
        if len(pieces) != len(spliced) + 1:  # extra_body named a slot: cannot happen by chance
            raise _Fatal("could not place the images in the request body")
        out = [pieces[0]]
        for url, piece in zip(spliced, pieces[1:]):
            out += [b'"', url, b'"', piece]
        return b"".join(out)

    def _body(self, prompt: Prompt, params: GenerationParams, urls: Sequence[bytes | str],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The request as a mapping; a data URL (bytes) stands as the slot string `_payload` fills."""
        messages: list[dict[str, Any]] = []
        if prompt.system:
            messages.append({"role": "system", "content": prompt.system})
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": u if isinstance(u, str) else self._slot}} for u in urls]
        parts.append({"type": "text", "text": prompt.user})
        # a text-only prompt goes as a plain string: some servers (and text models) want that
        messages.append({"role": "user", "content": parts if prompt.images else prompt.user})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if prompt.assistant_prefix:
            if self.prefix_mode == "refuse":
                raise _Fatal("this prompt has an assistant_prefix but prefix_mode='refuse'")
            messages.append({"role": "assistant", "content": prompt.assistant_prefix})
            if self.prefix_mode == "continue":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        body.update(self.extra_body)
        body.update(extra or {})
        return body

    # ---- sending, retries, load balancing ---------------------------------------------------

    def _one(self, prompt: Prompt, params: GenerationParams) -> Generation:
        try:
            payload = self._payload(prompt, params)
        except (OSError, ValueError, _Fatal) as e:  # unreadable image file, refused URL, ...
            return Generation(text=None, error=f"request not sent: {e}", extra={"client_error": True})
        resp, attempts, endpoint = self._request_with_retries(payload)
        extra: dict[str, Any] = {"attempts": attempts, "endpoint": endpoint}
        if isinstance(resp, Exception):
            # already retried here as far as it makes sense: sending it again cannot help
            extra["retryable"] = False
            if isinstance(resp, _Fatal):
                extra["client_error"] = True
            return Generation(text=None, error=str(resp), extra=extra)
        try:
            choice = resp["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError) as e:
            return Generation(text=None, error=f"malformed response from {endpoint}: {type(e).__name__}: {e}", extra=extra)
        usage = resp.get("usage") or {}
        extra["finish_reason"] = choice.get("finish_reason")
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            extra=extra,
        )

    def _pick(self) -> _Endpoint:
        """Least outstanding requests among endpoints not benched; if all are benched, the one
        that comes back first (a dead fleet still gets tried, so errors are reported, not hung).

        An endpoint back from the bench takes one probe request at a time until one succeeds:
        with no requests outstanding it would otherwise look least busy and draw them all."""
        with self._lock:
            now = time.monotonic()
            live = [e for e in self.endpoints if self._eligible(e, now)]
            pool = live or [min(self.endpoints, key=lambda e: e.benched_until)]
            ep = min(pool, key=lambda e: (e.outstanding, e.sent))
            ep.outstanding += 1
            ep.sent += 1
            return ep

    def _eligible(self, e: _Endpoint, now: float) -> bool:
        return e.benched_until <= now and (e.failures == 0 or e.outstanding == 0)

    def _release(self, ep: _Endpoint, error: _Retryable | None = None) -> None:
        """Book the end of a request. A failed endpoint is benched: for its Retry-After, or for
        a time that doubles with its consecutive failures (a 429 without Retry-After: `backoff`)."""
        with self._lock:
            ep.outstanding -= 1
            if error is None:
                ep.failures, ep.benched_until = 0, 0.0
                return
            if error.endpoint_fault:
                ep.failures += 1
                bench = min(self.max_backoff, self.backoff * 2 ** (ep.failures - 1))
            else:
                bench = self.backoff
            if error.retry_after is not None:
                bench = max(bench, error.retry_after)
            ep.benched_until = max(ep.benched_until, time.monotonic() + bench)

    def _request_with_retries(self, payload: bytes) -> tuple[dict | Exception, int, str]:
        """(parsed response or the final error, attempts made, last endpoint URL)."""
        last = _Retryable("error", "no attempt made")
        ep_url = ""
        for attempt in range(self.max_retries + 1):
            ep = self._pick()
            ep_url = ep.label
            try:
                resp = self._post(ep, payload)
            except _Fatal as e:
                self._release(ep)  # the request was bad, not the endpoint
                return e, attempt + 1, ep_url
            except _Retryable as e:
                self._release(ep, e)
                last = e
                if attempt == self.max_retries:
                    break
                delay = self._delay(attempt, e)
                if e.retry_after is not None and delay > self.max_retry_after:
                    # waiting an hour per prompt is worse than failing the row with the reason
                    return RuntimeError(f"{e.kind}: server asked to retry after {e.retry_after:g}s, over "
                                        f"max_retry_after={self.max_retry_after:g}s: {e.detail}"), attempt + 1, ep_url
                time.sleep(delay)
                continue
            self._release(ep)
            return resp, attempt + 1, ep_url
        n = self.max_retries
        return RuntimeError(f"{last.kind} after {n} {'retry' if n == 1 else 'retries'}: {last.detail}"), n + 1, ep_url

    def _delay(self, attempt: int, e: _Retryable) -> float:
        """Seconds before the next try: none when another endpoint can take it (fail over);
        else exponential backoff with jitter (so many threads do not retry in lockstep), and
        at least the server's Retry-After."""
        now = time.monotonic()
        with self._lock:
            if any(self._eligible(ep, now) for ep in self.endpoints):
                return 0.0
        delay = min(self.max_backoff, self.backoff * 2**attempt * (0.5 + random.random()))
        return delay if e.retry_after is None else max(delay, e.retry_after)

    def _connection(self, ep: _Endpoint) -> tuple[http.client.HTTPConnection, str]:
        conns = self._local.__dict__.setdefault("conns", {})
        u = urllib.parse.urlsplit(ep.url)
        path = (u.path or "") + "/chat/completions"
        conn = conns.get(ep.url)
        if conn is None:
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = cls(u.hostname or "localhost", u.port, timeout=self.timeout)
            conns[ep.url] = conn
        return conn, path

    def _drop(self, ep: _Endpoint) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(ep.url, None)
        if conn is not None:
            conn.close()

    def _post(self, ep: _Endpoint, payload: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        # a kept-alive connection may have been closed by the server since its last use; one
        # immediate retry on a fresh connection is not a real failure of the endpoint
        for fresh_retry in (False, True):
            conn, path = self._connection(ep)
            reused = getattr(conn, "sock", None) is not None
            try:
                conn.request("POST", path, body=payload, headers=headers)
                r = conn.getresponse()
                status, data = r.status, r.read()
                retry_after = _retry_after(r.getheader("Retry-After"))
                if r.getheader("Connection", "").lower() == "close":
                    self._drop(ep)
                break
            except TimeoutError as e:
                self._drop(ep)
                raise _Retryable(f"timeout ({self.timeout:g}s)", f"no reply from {ep.label}") from e
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self._drop(ep)
                if reused and not fresh_retry:
                    continue
                raise _Retryable("connection error", f"{ep.label}: {type(e).__name__}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop(ep)
                raise _Retryable("connection error", f"{ep.label}: {type(e).__name__}: {e}") from e
        if status == 200:
            try:
                return json.loads(data)
            except ValueError as e:
                # a proxy's HTML error page or a truncated body: the endpoint misbehaves, try again
                raise _Retryable("malformed reply", f"not JSON from {ep.label}: {data[:200]!r}") from e
        msg = _server_message(data)
        if status in (408, 429):  # the server timed out waiting for us, or is busy: alive, try again
            raise _Retryable(f"HTTP {status}", msg, retry_after, endpoint_fault=False)
        if status >= 500:
            raise _Retryable(f"HTTP {status}", f"{msg} ({ep.label})", retry_after)
        raise _Fatal(f"HTTP {status} from {ep.label}: {msg}")
