"""Perception Collection rows -> Feedback Collection rows (the image replaced by its caption).

The published Feedback Collection has the Perception Collection's columns without `image`; a
text judge trained on converted rows sees exactly what the caption bridge gives it at scoring
time, because both use `text_judge.captions.bridge_instruction` and `vlm_judge.prompts.render`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from text_judge.captions import bridge_instruction
from vlm_judge.inputs import InputOptions, RowError, row_id_of, row_to_request
from vlm_judge.prompts import render


def perception_to_feedback(
    rows: Iterable[dict[str, Any]],
    captions: Mapping[str, str] | Callable[[dict[str, Any]], str | None],
    source: str,
    template: str = "default",
    errors: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one Feedback Collection row per Perception row that has a caption.

    `captions` maps a row's `image` value (or its id) to the caption, or is a function of the row.
    Each output row keeps the `orig_*` columns and `output`, puts the caption block before
    `orig_instruction`, re-renders `instruction` (the full text prompt) with `template`, drops
    `image`, and adds `caption` and `caption_source`. Rows without a caption or with a broken
    rubric are skipped; their reasons go into `errors` ({row id: reason}) when given.
    """
    for index, row in enumerate(rows):
        rid = row_id_of(row, index)
        image = row.get("image")
        if callable(captions):
            cap = captions(row)
        else:
            cap = captions.get(str(image)) if image is not None else None
            cap = cap if cap is not None else captions.get(rid)
        if image is not None and (cap is None or not str(cap).strip()):
            if errors is not None:
                errors[rid] = f"no caption for image {image!r}"
            continue
        out = {k: v for k, v in row.items() if k != "image"}
        if image is not None:
            out["orig_instruction"] = bridge_instruction(str(row.get("orig_instruction", "")), [str(cap)])
        try:
            req = row_to_request(out, index, InputOptions(check_images=False))
        except RowError as e:
            if errors is not None:
                errors[rid] = e.reason
            continue
        out["instruction"] = render(req, template).user
        if image is not None:
            out["caption"] = str(cap).strip()
            out["caption_source"] = source
        yield out
