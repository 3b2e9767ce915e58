"""Benchmark loaders: judge-evaluation files on disk -> items with human gold labels.

Nothing downloads. Rows are read by `vlm_judge.inputs` (the one row reader: file types, each
format's columns as data, one image policy, one rubric loader); this module adds the human gold.
`column_map` overrides any field's column. A row that cannot become an item (no gold label, image
missing or refused, bad JSON, empty response) is recorded in `Benchmark.skipped` with its line and
the reason, never silently dropped.

Formats:
- visit: VisIT-Bench style: instruction, image, instruction-conditioned caption, reference
  output, category, and either a response with human rating(s) or two responses with a human
  preference.
- perception: Perception-Bench / Perception Collection rows (`orig_*` parts; the rendered prompt
  in `instruction` is ignored; `original_response` or `orig_response`).
- llava: LLaVA-Bench style: question, image, answer, gold score (often 1..10: use `gold_scale`),
  caption, category.
- feedback: Feedback Bench (text only, `orig_*` parts).
- mtbench: MT-Bench human judgments: `conversation_a/_b` (or question/answer_a/answer_b),
  `model_a/_b`, `winner`, `turn`.
- jsonl: generic rows with a gold score or a preference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_judge import inputs
from vlm_judge.inputs import InputOptions, Row
from vlm_judge.inputs import detect_format as detect
from vlm_judge.records import JudgeRequest, Rubric

FORMATS = ("visit", "perception", "llava", "feedback", "mtbench", "jsonl")
"""Benchmark formats (their columns are `vlm_judge.inputs.FORMATS`)."""

# Our rubric for benchmarks that carry none (VisIT, LLaVA-Bench, MT-Bench); our own wording.
DEFAULT_RUBRIC = Rubric(
    criteria="Does the response follow the instruction helpfully and correctly, staying true to the image "
    "(when there is one) and to the reference answer (when there is one)?",
    score_descriptions=(
        "The response ignores the instruction or is mostly wrong or invented.",
        "The response addresses the instruction but has major errors or misses most of what was asked.",
        "The response is partly correct and partly helpful, with clear errors or gaps.",
        "The response is correct and helpful with only minor errors or omissions.",
        "The response fully and correctly answers the instruction with nothing important missing.",
    ),
)
_DETECT = ("mtbench", "perception", "feedback", "visit", "llava")


@dataclass
class BenchItem:
    """One benchmark item: the request a judge sees and what humans said about it."""

    id: str
    request: JudgeRequest
    """The request as a vision judge sees it (images attached when the benchmark has them)."""
    gold: float | str
    """Human gold: a score on the 1..5 scale (mean of raters, rescaled) or 'A'/'B'/'tie'."""
    category: str = ""
    caption: str | None = None
    """The benchmark's description of the image (what a text judge is given instead)."""
    model: str | None = None
    """Which model wrote the response (response A in relative mode)."""
    model_b: str | None = None
    human_scores: list[float] = field(default_factory=list)
    """Each human rating, on the 1..5 scale, when the row had several."""
    row: int = 0
    """1-based line/row number in the source file."""

    @property
    def mode(self) -> str:
        return self.request.mode


@dataclass
class Benchmark:
    """Loaded items plus every row that did not make it, with the reason."""

    name: str
    format: str
    items: list[BenchItem]
    skipped: list[dict[str, Any]]
    """{'row', 'id', 'reason'} for each row left out."""
    source: str = ""
    rows: int = 0
    """Rows read from the file (items + skipped)."""

    @property
    def has_images(self) -> bool:
        return any(it.request.images for it in self.items)


def detect_format(row: dict[str, Any]) -> str:
    """Guess the benchmark format from one row's keys."""
    return detect(row, among=_DETECT, fallback="jsonl")


def parse_column_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'gold=my_rating,image=img' or a dict -> {our field: source column}."""
    return inputs.parse_column_map(spec)


def normalize_preference(v: Any) -> str | None:
    """'A'/'B'/'tie' from the many ways files say it (model_a, 'Response B', 'tie (bothbad)', 1/2)."""
    s = str(v).strip().lower()
    if s in ("a", "model_a", "response a", "response_a", "1", "left"):
        return "A"
    if s in ("b", "model_b", "response b", "response_b", "2", "right"):
        return "B"
    if s.startswith("tie") or s in ("both", "equal", "neither", "0"):
        return "tie"
    return None


def _score(v: Any) -> list[float]:
    """One or more numeric ratings (a list, a number, or a numeric string). A yes/no human judgment
    (VisIT-Bench's `human_ratings_gpt4_correct`) maps to the ends of the scale: True 5, False 1."""
    if isinstance(v, bool) or (isinstance(v, str) and v.strip().lower() in ("true", "false")):
        return [5.0 if v is True or str(v).strip().lower() == "true" else 1.0]
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v if x is not None]
    if isinstance(v, dict):  # {'rater1': 4, ...}
        return [float(x) for x in v.values() if x is not None]
    return [float(v)]


def _gold(row: Row, relative: bool, lo: float, hi: float) -> tuple[float | str, list[float]]:
    """(gold, each human rating on 1..5) from the row's gold column."""
    gold_raw = row.get("gold")
    if gold_raw is None:
        raise ValueError(f"missing gold label (looked for {list(row.columns.get('gold', ()))})")
    if relative:
        pref = normalize_preference(gold_raw)
        if pref is None:
            raise ValueError(f"unreadable preference {gold_raw!r} (want A, B or tie)")
        return pref, []
    try:
        binary = isinstance(gold_raw, bool) or str(gold_raw).strip().lower() in ("true", "false")
        human = _score(gold_raw) if binary else [1.0 + 4.0 * (s - lo) / (hi - lo) for s in _score(gold_raw)]
    except (TypeError, ValueError):
        raise ValueError(f"gold score {gold_raw!r} is not a number") from None
    if not human:
        raise ValueError("missing gold label (empty list of ratings)")
    gold = sum(human) / len(human)
    if not 1.0 - 1e-9 <= gold <= 5.0 + 1e-9:
        raise ValueError(f"gold score {gold_raw!r} falls outside the scale {lo:g}..{hi:g}")
    return gold, human


def load_benchmark(
    path: str | Path,
    format: str | None = None,
    column_map: str | dict[str, str] | None = None,
    rubric: Rubric | str | Path | None = None,
    image_root: str | Path | None = None,
    image_rewrites: dict[str, str] | None = None,
    allowed_image_dirs: list[str | Path] | None = None,
    gold_scale: tuple[float, float] = (1.0, 5.0),
    limit: int | None = None,
) -> Benchmark:
    """Load a benchmark file into items with gold labels; rows that fail are listed with reasons.

    Rows are read by `vlm_judge.inputs` (its file types, format columns and image policy: images
    resolve against `image_root`, default the file's folder, after `image_rewrites`, and must lie
    inside `allowed_image_dirs`, default the root and the rewrite targets). `rubric` (a Rubric or a
    rubric file, as `score --rubric` takes) is used for rows without their own, else DEFAULT_RUBRIC.
    `gold_scale` (lo, hi) maps numeric gold linearly onto 1..5 (e.g. (1, 10) for LLaVA-Bench).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    lo, hi = gold_scale
    if hi <= lo:
        raise ValueError(f"gold_scale must be (low, high) with high > low, got {gold_scale}")
    library: dict[str, Rubric] = {}
    if isinstance(rubric, (str, Path)):
        rubric, library = inputs.load_rubrics(rubric)
    if format is None:
        first = next((r.data for r in inputs.iter_rows(path) if r.error is None), {})
        format = detect_format(first)
    if format not in FORMATS:
        raise ValueError(f"unknown benchmark format {format!r}; choose one of {FORMATS}")
    opts = InputOptions(
        image_root=image_root, image_rewrites=dict(image_rewrites or {}), allowed=allowed_image_dirs,
        column_map=parse_column_map(column_map), default_rubric=rubric or DEFAULT_RUBRIC, rubrics=library,
        fill_rubric=DEFAULT_RUBRIC, check_images="verify", format=format, duplicate_ids="number",
    )
    root = opts.root_for(path)
    vision = inputs.FORMATS[format].vision
    items: list[BenchItem] = []
    skipped: list[dict[str, Any]] = []
    for row in inputs.iter_rows(path, opts):
        if limit is not None and len(items) + len(skipped) >= limit:
            break
        try:
            if row.error is not None:
                raise row.error
            gold, human = _gold(row, inputs.is_pairwise(row), lo, hi)  # before the image: no gold, no item
            if vision and row.get("image") is None:
                raise ValueError(f"missing image (looked for {list(row.columns.get('image', ()))})")
            request = inputs.to_request(row, opts, root)
        except ValueError as e:  # RowError is one
            skipped.append({"row": row.line, "id": row.id, "reason": str(e)})
            continue
        caption, model, model_b = row.get("caption"), row.get("model"), row.get("model_b")
        items.append(BenchItem(
            id=row.id, request=request, gold=gold, category=str(row.get("category") or ""),
            caption=str(caption) if caption is not None else None,
            model=str(model) if model is not None else None, model_b=str(model_b) if model_b is not None else None,
            human_scores=human if len(human) > 1 else [], row=row.line,
        ))
    return Benchmark(path.stem, format, items, skipped, str(path), len(items) + len(skipped))
