"""text_judge: the text-only judge over vlm_judge's scorer, and the caption bridge.

- `TextJudge.load(name_or_path_or_preset, ...)`: a `vlm_judge.Judge` that refuses images per row,
  or grades their captions when given `captions=` (a list, mapping, `Captioner` or function).
- `caption_bridge(requests, captions)`: text-only requests whose instruction carries the
  captions (fixed layout, see `bridge_instruction`); the result records the caption `.source`.
- `BackendCaptioner.load(model, backend="hf")`: captions each distinct image once with a named model.
- `perception_to_feedback(rows, captions, source)`: Perception Collection rows -> Feedback
  Collection rows with the image replaced by its caption.
"""

from text_judge.captions import (
    CAPTION_PROMPT,
    BackendCaptioner,
    BridgedRequests,
    Captioner,
    bridge_instruction,
    caption_bridge,
)
from text_judge.feedback_collection import perception_to_feedback
from text_judge.judge import TEXT_PRESETS, TextJudge

__all__ = [
    "CAPTION_PROMPT",
    "TEXT_PRESETS",
    "BackendCaptioner",
    "BridgedRequests",
    "Captioner",
    "TextJudge",
    "bridge_instruction",
    "caption_bridge",
    "perception_to_feedback",
]
