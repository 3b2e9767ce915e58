"""TextJudge: the scorer for text-only judges, with named presets for published text judges.

It is the same `vlm_judge.Judge` (same templates, parser, retries, swap and sampling); the only
difference is what happens to a request that carries images. A text judge cannot see them, so
it either refuses the row (status 'error', the default: nothing is judged blind silently) or, when
given a caption source, grades the captioned text request (`text_judge.caption_bridge`).
Templates use their vision wording only for requests with images, so bridged requests get the
plain text prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from text_judge.captions import CaptionSource, caption_bridge
from vlm_judge import __version__
from vlm_judge.presets import PRESETS, Preset
from vlm_judge.records import JudgeRequest, Judgment
from vlm_judge.scorer import Judge, ScorerConfig

# Published text judges: the text entries of the one preset table (resolved by `Judge.load`).
TEXT_PRESETS: dict[str, Preset] = {name: p for name, p in PRESETS.items() if p.kind == "text"}

REFUSED = "a text judge cannot see images: give TextJudge captions (text_judge.caption_bridge) or use a vision judge"


class TextJudge(Judge):
    """A Judge for text-only models. Requests with images are refused per row unless `captions`
    is set (then they are bridged to text first; the source is in `caption_source`)."""

    def __init__(self, backend: Any, config: ScorerConfig | None = None, name: str | None = None,
                 captions: CaptionSource | None = None) -> None:
        super().__init__(backend, config, name)
        self.captions = captions
        self.caption_source: str | None = None

    @classmethod
    def load(cls, name_or_path: str, backend: str | None = None, config: ScorerConfig | None = None,
             captions: CaptionSource | None = None, **backend_kwargs: Any) -> TextJudge:
        """Like `Judge.load` (a preset name picks its model and template there)."""
        judge = super().load(name_or_path, backend=backend, config=config, **backend_kwargs)
        assert isinstance(judge, TextJudge)
        judge.captions = captions
        return judge

    def grade(self, requests: Sequence[JudgeRequest], progress: Callable[[int], None] | None = None) -> list[Judgment]:
        reqs = list(requests)
        with_images = [k for k, r in enumerate(reqs) if r.images]
        if with_images and self.captions is not None:
            bridged = caption_bridge([reqs[k] for k in with_images], self.captions)
            self.caption_source = bridged.source
            for k, r in zip(with_images, bridged):
                reqs[k] = r
            with_images = []
        refused = set(with_images)
        graded = iter(super().grade([r for k, r in enumerate(reqs) if k not in refused], progress=progress))
        return [self._refuse(r) if k in refused else next(graded) for k, r in enumerate(reqs)]

    def _refuse(self, r: JudgeRequest) -> Judgment:
        return Judgment(id=r.id, mode=r.mode, score=None, status="error", reason=REFUSED, attempts=0,
                        judge=self.name, template=self._template(r.mode).name, version=__version__)
