"""Captions for text judges: the benchmark's own, or written by a named captioning model.

A text judge sees the same item as a vision judge with the image replaced by its caption, so a
comparison of the two isolates what seeing the image is worth. The caption source is fixed per
run and written into the report. The layout is text_judge's caption bridge, the one a TextJudge
and a caption text judge's training data use, so every path renders captions alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from text_judge import BackendCaptioner
from vlm_judge.backends import Backend
from vlm_judge.records import JudgeRequest

BRIDGE_SOURCE = "text_judge.caption_bridge"
"""The caption layout in use (reported)."""


def caption_with_model(
    backend: Backend, requests: Sequence[JudgeRequest], max_new_tokens: int = 160
) -> tuple[dict[str, str], dict[str, str], str]:
    """Caption each distinct image once with `backend` (text_judge's `BackendCaptioner`).

    Returns ({image-set key: caption}, {image-set key: error}, caption source description)."""
    sets: dict[str, JudgeRequest] = {}
    for r in requests:
        if r.images and r.image_key not in sets:
            sets[r.image_key] = r
    cap = BackendCaptioner(backend, max_new_tokens=max_new_tokens)
    allims = [im for r in sets.values() for im in r.images]
    got = dict(zip((im.key for im in allims), cap.caption(allims)))
    caps: dict[str, str] = {}
    errs: dict[str, str] = {}
    for k, r in sets.items():
        parts = [got.get(im.key) for im in r.images]
        if all(parts):
            caps[k] = "\n".join(p for p in parts if p)
        else:
            errs[k] = "; ".join(cap.errors.get(im.key, "no caption") for im in r.images if not got.get(im.key))
    return caps, errs, cap.source
