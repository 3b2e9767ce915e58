"""The caption bridge: a request with images becomes a text request whose instruction carries
each image's caption, so a text-only judge can grade it.

The layout is fixed (a comparison of text and vision judges must not vary it):

    Image description: <caption>              (one image)
    Image 1 description: <caption 1>          (several images, in the request's order)
    Image 2 description: <caption 2>

    <the original instruction>

Captions come from the data (a list aligned with the requests, or a dict keyed by request id,
image-set key or single-image key) or from a `Captioner`, e.g. `BackendCaptioner` asking a named
model through any vlm_judge backend. The result records where the captions came from (`.source`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, Union, runtime_checkable

from vlm_judge.backends import Backend, GenerationParams, Prompt, get_backend
from vlm_judge.records import ImageRef, JudgeRequest

CAPTION_PROMPT = (
    "Describe this image in detail: the objects, people and animals in it, any text, counts, colours "
    "and where things are. Write plain sentences."
)
"""What a BackendCaptioner asks the captioning model (fixed, so the caption source is reproducible)."""


def bridge_instruction(instruction: str, captions: Sequence[str]) -> str:
    """The instruction a text judge sees: the caption block, a blank line, then the instruction."""
    caps = [c.strip() for c in captions]
    if len(caps) == 1:
        block = f"Image description: {caps[0]}"
    else:
        block = "\n".join(f"Image {i} description: {c}" for i, c in enumerate(caps, 1))
    return f"{block}\n\n{instruction}"


@runtime_checkable
class Captioner(Protocol):
    """Writes one caption per image. `source` names the captions' origin and goes into reports."""

    source: str

    def caption(self, images: Sequence[ImageRef]) -> list[str | None]:
        """One caption per image, in order; None where this image could not be captioned."""
        ...


class BackendCaptioner:
    """Captions images with a named model through a vlm_judge backend (greedy, fixed prompt).

    Each distinct image is captioned once per captioner (cached by its key). Failures are kept in
    `errors` ({image key: reason}) and returned as None.
    """

    def __init__(self, backend: Backend, prompt: str = CAPTION_PROMPT, max_new_tokens: int = 160,
                 batch_size: int = 8) -> None:
        self.backend = backend
        self.prompt = prompt
        self.params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        self.batch_size = batch_size
        self.cache: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        default = " (default caption prompt)" if prompt == CAPTION_PROMPT else " (custom caption prompt)"
        self.source = f"model {backend.name}{default}, greedy, max_new_tokens={max_new_tokens}"

    @classmethod
    def load(cls, model: str, backend: str = "hf", **kw: Any) -> BackendCaptioner:
        """A captioner over `get_backend(backend, model=model, **kw)`; captioner options go in kw too."""
        own = {k: kw.pop(k) for k in ("prompt", "max_new_tokens", "batch_size") if k in kw}
        return cls(get_backend(backend, model=model, **kw), **own)

    def caption(self, images: Sequence[ImageRef]) -> list[str | None]:
        todo: dict[str, ImageRef] = {}
        for im in images:
            if im.key not in self.cache and im.key not in todo:
                todo[im.key] = im
        keys = list(todo)
        for start in range(0, len(keys), self.batch_size):
            part = keys[start : start + self.batch_size]
            gens = self.backend.generate([Prompt(user=self.prompt, images=(todo[k],)) for k in part], self.params)
            for k, g in zip(part, gens):
                if g.error is None and g.text and g.text.strip():
                    self.cache[k] = g.text.strip()
                    self.errors.pop(k, None)
                else:
                    self.errors[k] = g.error or "empty caption"
        return [self.cache.get(im.key) for im in images]


CaptionSource = Union[Sequence[Union[str, None]], Mapping[str, str], Captioner, Callable[[ImageRef], str]]


class BridgedRequests(list):
    """The bridged requests (a list), plus `.source` (where captions came from) and `.captions`
    ({request id: the caption text used})."""

    source: str
    captions: dict[str, str]


def _captions_for(requests: Sequence[JudgeRequest], captions: Any) -> tuple[list[list[str] | None], str]:
    """Per request: the captions for its images (None where one is missing), and the source."""
    if isinstance(captions, Captioner) or hasattr(captions, "caption"):
        allims = [im for r in requests for im in r.images]
        got = dict(zip((im.key for im in allims), captions.caption(allims)))
        per = [[got[im.key] for im in r.images] for r in requests]
        return [None if any(c is None for c in p) else p for p in per], captions.source  # type: ignore[misc]
    if isinstance(captions, Mapping):
        out: list[list[str] | None] = []
        for r in requests:
            hit = captions.get(r.id) or captions.get(r.image_key)
            if hit is not None:
                out.append([hit])
            else:
                per_image = [captions.get(im.key) or (captions.get(im.path) if im.path else None) for im in r.images]
                out.append(None if any(c is None for c in per_image) else per_image)  # type: ignore[misc]
        return out, "given captions (mapping)"
    if callable(captions):
        name = getattr(captions, "__name__", type(captions).__name__)
        return [[captions(im) for im in r.images] for r in requests], f"function {name}"
    if isinstance(captions, Sequence) and not isinstance(captions, str):
        if len(captions) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(captions)} captions")
        return [None if c is None else [c] for c in captions], "given captions (list)"
    raise TypeError("captions must be a list aligned with the requests, a mapping, a Captioner or a function")


def caption_bridge(requests: Sequence[JudgeRequest], captions: CaptionSource, source: str | None = None) -> BridgedRequests:
    """Text-only copies of `requests`: images removed, their captions put before the instruction.

    Requests without images pass through unchanged. `captions` is a list (one caption per request,
    describing its images), a mapping (by request id, image-set key, or each image's key or
    resolved path), a
    `Captioner`, or a function ImageRef -> caption. `source` overrides the recorded caption source.
    A request with images but no caption raises ValueError naming every such request.
    """
    per, default_source = _captions_for(list(requests), captions)
    missing = [r.id for r, c in zip(requests, per) if r.images and (c is None or not all(x and x.strip() for x in c))]
    if missing:
        raise ValueError(f"no caption for the images of {len(missing)} request(s): {missing[:20]}")
    out = BridgedRequests()
    out.source = source or default_source
    out.captions = {}
    for r, caps in zip(requests, per):
        if not r.images:
            out.append(r)
            continue
        assert caps is not None
        out.captions[r.id] = "\n".join(caps)
        out.append(replace(r, images=(), instruction=bridge_instruction(r.instruction, caps)))
    return out
