"""vlm-judge: multimodal LLM-as-a-judge. Score, build data for, train and meta-evaluate judges."""

__version__ = "0.1.0"

from vlm_judge.records import ImageRef, JudgeRequest, Judgment, RecordError, Rubric  # noqa: E402
from vlm_judge.scorer import Judge, ScorerConfig  # noqa: E402

__all__ = ["ImageRef", "Judge", "JudgeRequest", "Judgment", "RecordError", "Rubric", "ScorerConfig", "__version__"]
