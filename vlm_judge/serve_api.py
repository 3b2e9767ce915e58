"""The OpenAI chat-completions request and reply of `vlm-judge serve`, without any HTTP.

Every client mistake becomes an `ApiError` carrying its 4xx status and a message naming the
field and the limit, so the server answers it without touching the model, and clients (ours
included) do not retry it.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from typing import Any

from vlm_judge.backends.base import Generation, GenerationParams, Prompt
from vlm_judge.images import DEFAULT_MAX_PIXELS, ImageError, check_image
from vlm_judge.records import ImageRef

MAX_IMAGES = 16
"""Images one request may carry."""
MAX_STOP = 4
"""Stop strings one request may carry (OpenAI's limit)."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds a torch generator takes."""


class ApiError(Exception):
    """A request this server will not serve, with the HTTP status that says why."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


class BadRequest(ApiError):
    """A malformed or out-of-range request (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
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


def prompt_from_messages(messages: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prompt:
    """Map OpenAI chat messages to a Prompt: system text, ONE user turn (text + data-URL images),
    and an optional final assistant message, which becomes the assistant prefix to continue.

    Images are placed before the text, as every vlm_judge template expects; a judge prompt has
    one user turn, so multi-turn conversations are refused rather than silently flattened. Each
    image is checked from its header (format, pixels, aspect ratio) here, before it is queued.
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
                        if len(images) == MAX_IMAGES:
                            raise BadRequest(f"more than {MAX_IMAGES} images in one request")
                        data = decode_data_url(url)
                        try:
                            check_image(data, max_pixels, f"messages[{i}].content[{j}]")
                        except ImageError as e:
                            raise BadRequest(str(e)) from e
                        images.append(ImageRef(data=data))
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


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"{name} must be a finite number (got {v!r})")
    if v < low or v > high or (low_open and v == low):
        raise BadRequest(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}] (got {v!r})")
    return float(v)


def _integer(v: Any, name: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer (got {v!r})")
    if not low <= v <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}] (got {v})")
    return v


def params_from_body(body: dict, max_tokens_limit: int = 1 << 20) -> GenerationParams:
    """Sampling parameters from the request. Unlike OpenAI, temperature defaults to 0 (greedy):
    a judge should be reproducible unless asked otherwise. What this server cannot honour
    (streaming, n > 1, logprobs) is refused, not ignored."""
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this server")
    if body.get("n") not in (None, 1):
        raise BadRequest("n must be 1")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported by this server")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    raw = body.get(name)
    max_new = GenerationParams.max_new_tokens if raw is None else _integer(raw, name, 1, max_tokens_limit)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings")
    seed = body.get("seed")
    return GenerationParams(
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=None if seed is None else _integer(seed, "seed", *SEED_RANGE),
        stop=stops,
    )


def check_context(prompt: Prompt, params: GenerationParams, context: int | None, token_chars: int | None) -> None:
    """Refuse a request that cannot fit the model's context, before any tokenizing: max_tokens
    alone, then a lower bound on the prompt's tokens from its length in characters (no token is
    longer than `token_chars` characters). A prompt under the bound is checked exactly when it
    is encoded, and a still-too-long one is answered 400 then."""
    if not context:
        return
    if params.max_new_tokens >= context:
        raise BadRequest(f"max_tokens {params.max_new_tokens} does not fit the model's context of {context} tokens")
    if token_chars:
        chars = len(prompt.user) + len(prompt.system or "") + len(prompt.assistant_prefix)
        at_least = chars // token_chars
        if at_least + params.max_new_tokens > context:
            raise BadRequest(f"prompt has at least {at_least} tokens ({chars} characters) + max_tokens "
                             f"{params.max_new_tokens}, over the model's context of {context} tokens")


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


def model_json(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "vlm-judge"}
