"""The one small interface every backend implements, and the types that cross it.

A backend turns rendered prompts into text. It knows nothing about rubrics or scores: the
scorer renders requests with `vlm_judge.prompts` and parses outputs with `vlm_judge.parse`,
so a new backend is only a `generate` function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vlm_judge.records import ImageRef


@dataclass(frozen=True)
class Prompt:
    """A rendered chat prompt: optional system text, one user turn, and its images.

    Images are kept apart from the text; each backend places them the way its model expects
    (LLaVA's `<image>` token through the processor's chat template, data URLs for OpenAI servers).
    """

    user: str
    """The user turn's text, without image placeholders."""
    system: str | None = None
    """System message, if the template has one."""
    images: tuple[ImageRef, ...] = ()
    """Images shown before the text of the user turn."""
    assistant_prefix: str = ""
    """Text the assistant turn is forced to start with (continued, not regenerated)."""


@dataclass(frozen=True)
class GenerationParams:
    """How to sample. Greedy by default so that judgments are reproducible."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: int | None = 0
    """Seed for sampling; the scorer derives one per retry/sample from it."""
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """What a backend returns for one prompt: text, or an error saying why there is none."""

    text: str | None
    error: str | None = None
    """Set when the backend could not produce text for this prompt (the other prompts go on)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Generates text for a batch of prompts. Must not raise for one bad prompt: return its error."""

    name: str
    """The model's name or path, recorded in every judgment."""

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One Generation per prompt, in order."""
        ...


@runtime_checkable
class ScoresTokens(Protocol):
    """Optional capability: probabilities of candidate next tokens after a given continuation.

    Used for G-Eval-style expected scores: prompt + the judge's output up to the verdict marker,
    then the probability of each of '1'..'5'.
    """

    def next_token_probs(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], candidates: Sequence[str]
    ) -> list[dict[str, float]]:
        ...


@runtime_checkable
class Prefetches(Protocol):
    """Optional capability: start loading and preprocessing the images of prompts that will be
    generated next, in the background, so that this work overlaps the current batch's generation.
    Must return at once and never raise (a bad image is reported when its prompt is generated)."""

    def prefetch(self, prompts: Sequence[Prompt]) -> None:
        ...


@runtime_checkable
class SchedulesItself(Protocol):
    """Optional capability: the backend keeps its own requests in flight (a server client's pool of
    `concurrency` connections, vLLM's continuous batching). The scorer then hands it every prompt
    of an attempt in one `generate` call instead of batches of `batch_size`, so a slow request never
    holds back the next batch; `max_in_flight` is how many prompts it works on at once, and
    `concurrent_calls` how many `generate` calls may run at the same time (the bound holds across
    them: an OpenAI client shares one pool; an in-process engine takes one call at a time)."""

    max_in_flight: int
    concurrent_calls: int
