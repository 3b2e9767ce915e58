"""Captions for text judges: the benchmark's own, or written by a named captioning model.

A text judge sees the same item as a vision judge with the image replaced by its caption, so a
comparison of the two isolates what seeing the image is worth. The caption source is fixed per
run and written into the report.

`caption_bridge(requests, captions)` is text_judge's when that module provides it; otherwise the
minimal local version below (caption placed before the instruction, images removed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from vlm_judge.backends import Backend, GenerationParams, Prompt
from vlm_judge.records import JudgeRequest

CAPTION_PROMPT = (
    "Describe this image in detail: the objects, people and animals in it, any text, counts, colours "
    "and where things are. Write plain sentences."
)


def _local_bridge(requests: Sequence[JudgeRequest], captions: Sequence[str]) -> list[JudgeRequest]:
    out = []
    for req, cap in zip(requests, captions):
        out.append(replace(req, images=(), instruction=f"Image description: {cap.strip()}\n\n{req.instruction}"))
    return out


def _text_judge_bridge() -> tuple[Callable[..., Any] | None, str]:
    """text_judge's caption bridge when that package provides one (package or a submodule)."""
    for mod in ("text_judge", "text_judge.bridge", "text_judge.caption_bridge", "text_judge.captions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        fn = getattr(m, "caption_bridge", None)
        if callable(fn):
            return fn, f"{mod}.caption_bridge"
    return None, "eval.captions (local)"


def caption_bridge(requests: Sequence[JudgeRequest], captions: Sequence[str]) -> list[JudgeRequest]:
    """Text-only versions of `requests`, each carrying its caption instead of its images."""
    if len(requests) != len(captions):
        raise ValueError(f"{len(requests)} requests but {len(captions)} captions")
    fn, _ = _text_judge_bridge()  # prefer the text judge's own, so both paths render captions alike
    if fn is None:
        return _local_bridge(requests, captions)
    return list(fn(list(requests), list(captions)))


def bridge_source() -> str:
    """Which bridge is in use (reported)."""
    return _text_judge_bridge()[1]


def caption_with_model(
    backend: Backend, requests: Sequence[JudgeRequest], max_new_tokens: int = 160
) -> tuple[dict[str, str], dict[str, str], str]:
    """Caption each distinct image once with `backend`.

    Returns ({image-set key: caption}, {image-set key: error}, caption source description). Uses
    text_judge's `BackendCaptioner` when present (same prompt, its source string), else a local loop.
    """
    sets: dict[str, JudgeRequest] = {}
    for r in requests:
        if r.images and r.image_key not in sets:
            sets[r.image_key] = r
    try:
        from text_judge import BackendCaptioner  # type: ignore[attr-defined]
    except ImportError:
        BackendCaptioner = None  # noqa: N806
    caps: dict[str, str] = {}
    errs: dict[str, str] = {}
    if BackendCaptioner is not None:
        cap = BackendCaptioner(backend, max_new_tokens=max_new_tokens)
        allims = [im for r in sets.values() for im in r.images]
        got = dict(zip((im.key for im in allims), cap.caption(allims)))
        for k, r in sets.items():
            parts = [got.get(im.key) for im in r.images]
            if all(parts):
                caps[k] = "\n".join(p for p in parts if p)
            else:
                errs[k] = "; ".join(cap.errors.get(im.key, "no caption") for im in r.images if not got.get(im.key))
        return caps, errs, cap.source
    order = list(sets)
    prompts = [Prompt(user=CAPTION_PROMPT, images=sets[k].images) for k in order]
    gens = backend.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens)) if prompts else []
    for k, g in zip(order, gens):
        if g.error is None and g.text and g.text.strip():
            caps[k] = g.text.strip()
        else:
            errs[k] = g.error or "empty caption"
    return caps, errs, f"model {backend.name}, greedy, max_new_tokens={max_new_tokens}"
