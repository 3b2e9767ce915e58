"""Benchmark loaders: judge-evaluation files on disk -> items with human gold labels.

Nothing downloads. Each format is a default column map (our field -> the names that format
uses) plus a few format-specific conversions; `column_map` overrides any field. A row that
cannot become an item (no gold label, image missing or refused, bad JSON, empty response) is
recorded in `Benchmark.skipped` with its line and the reason, never silently dropped.

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

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlm_judge.images import resolve_image
from vlm_judge.records import JudgeRequest, RecordError, Rubric

FORMATS = ("visit", "perception", "llava", "feedback", "mtbench", "jsonl")

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

_COMMON = {
    "id": ["id", "question_id", "item_id", "idx"],
    "category": ["category", "instruction_category", "task", "type"],
    "model": ["model", "model_a", "response_model", "generator"],
    "model_b": ["model_b"],
    "criteria": ["orig_criteria", "criteria"],
    **{f"score{i}": [f"orig_score{i}_description", f"score{i}_description"] for i in range(1, 6)},
}

COLUMNS: dict[str, dict[str, list[str]]] = {
    "visit": {
        "instruction": ["instruction"],
        "image": ["image", "image_path", "image_file", "image_url"],
        "caption": ["instruction_conditioned_caption", "caption"],
        "reference": ["reference_output", "reference", "reference_answer"],
        "response": ["response", "output", "response_a", "A"],
        "response_b": ["response_b", "B"],
        "gold": ["human_ratings", "human_rating", "rating", "human_preference", "preference", "winner",
                 "human_ratings_gpt4_correct"],
    },
    "perception": {
        "instruction": ["orig_instruction"],
        "image": ["image"],
        "caption": ["caption"],
        "reference": ["orig_reference_answer"],
        "response": ["original_response", "orig_response"],
        "response_b": [],
        "gold": ["orig_score", "gold_score", "human_score", "score"],
    },
    "llava": {
        "instruction": ["question", "text", "instruction"],
        "image": ["image", "image_path"],
        "caption": ["caption", "context"],
        "reference": ["gpt4_answer", "reference", "reference_answer"],
        "response": ["answer", "response", "output"],
        "response_b": [],
        "gold": ["gold_score", "score", "human_score", "rating"],
    },
    "feedback": {
        "instruction": ["orig_instruction", "instruction"],
        "image": [],
        "caption": [],
        "reference": ["orig_reference_answer"],
        "response": ["orig_response", "original_response", "response"],
        "response_b": [],
        "gold": ["orig_score", "gold_score", "score"],
    },
    "mtbench": {
        "instruction": ["question", "instruction"],
        "image": [],
        "caption": [],
        "reference": ["reference"],
        "response": ["answer_a", "response_a"],
        "response_b": ["answer_b", "response_b"],
        "gold": ["winner", "preference"],
    },
    "jsonl": {
        "instruction": ["instruction", "question", "prompt"],
        "image": ["image", "image_path"],
        "caption": ["caption"],
        "reference": ["reference_answer", "reference"],
        "response": ["response", "answer", "output", "response_a"],
        "response_b": ["response_b", "answer_b"],
        "gold": ["gold", "gold_score", "human_score", "score", "preference", "label"],
    },
}
VISION_FORMATS = ("visit", "perception", "llava")


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


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None, error) for a .jsonl, .json (list or {'data': [...]}) or .csv file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".csv":
        return [(k + 2, dict(r), "") for k, r in enumerate(csv.DictReader(text.splitlines()))]
    if p.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("data") or data.get("rows") or list(data.values())
        return [(k + 1, r if isinstance(r, dict) else None, "" if isinstance(r, dict) else "row is not an object")
                for k, r in enumerate(data)]
    out: list[tuple[int, dict[str, Any] | None, str]] = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((k, None, f"bad JSON: {e.msg} at column {e.colno}"))
            continue
        out.append((k, r, "") if isinstance(r, dict) else (k, None, "row is not a JSON object"))
    return out


def detect_format(row: dict[str, Any]) -> str:
    """Guess the format from one row's keys."""
    keys = set(row)
    if "conversation_a" in keys or ("winner" in keys and "model_a" in keys):
        return "mtbench"
    if "orig_criteria" in keys:
        return "perception" if "image" in keys else "feedback"
    if "instruction_conditioned_caption" in keys:
        return "visit"
    if "question" in keys and "image" in keys:
        return "llava"
    return "jsonl"


def parse_column_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'gold=my_rating,image=img' or a dict -> {our field: source column}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"column map entry {part!r} is not FIELD=COLUMN")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _pick(row: dict[str, Any], names: list[str]) -> Any:
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    return None


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


def _mtbench_turns(row: dict[str, Any], turn: int) -> tuple[str, str, str] | None:
    """(instruction, answer A, answer B) from MT-Bench conversations; earlier turns become context."""
    ca, cb = row.get("conversation_a"), row.get("conversation_b")
    if not (isinstance(ca, list) and isinstance(cb, list)):
        return None

    def split(conv: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        users = [m.get("content", "") for m in conv if m.get("role") == "user"]
        bots = [m.get("content", "") for m in conv if m.get("role") == "assistant"]
        return users, bots

    ua, ba = split(ca)
    _, bb = split(cb)
    t = max(1, int(turn)) - 1
    if t >= len(ua) or t >= len(ba) or t >= len(bb):
        return None
    ctx = "".join(f"[Earlier turn {k + 1}] User: {ua[k]}\n" for k in range(t))
    return ctx + ua[t], ba[t], bb[t]


def load_benchmark(
    path: str | Path,
    format: str | None = None,
    column_map: str | dict[str, str] | None = None,
    rubric: Rubric | None = None,
    image_root: str | Path | None = None,
    image_rewrites: dict[str, str] | None = None,
    allowed_image_dirs: list[str | Path] | None = None,
    gold_scale: tuple[float, float] = (1.0, 5.0),
    limit: int | None = None,
) -> Benchmark:
    """Load a benchmark file into items with gold labels; rows that fail are listed with reasons.

    Images resolve against `image_root` (default: the file's folder) after `image_rewrites`;
    `gold_scale` (lo, hi) maps numeric gold linearly onto 1..5 (e.g. (1, 10) for LLaVA-Bench).
    """
    path = Path(path)
    raw = read_rows(path)
    if format is None:
        first = next((r for _, r, _ in raw if r), {})
        format = detect_format(first)
    if format not in FORMATS:
        raise ValueError(f"unknown benchmark format {format!r}; choose one of {FORMATS}")
    cols = {**_COMMON, **COLUMNS[format]}
    for k, v in parse_column_map(column_map).items():
        if k not in cols:
            raise ValueError(f"column map: unknown field {k!r}; fields are {sorted(cols)}")
        cols[k] = [] if v in ("", "-") else [v]  # '-' switches a field off
    root = Path(image_root) if image_root is not None else path.parent
    lo, hi = gold_scale
    if hi <= lo:
        raise ValueError(f"gold_scale must be (low, high) with high > low, got {gold_scale}")

    items: list[BenchItem] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, row, err in raw:
        if limit is not None and len(items) + len(skipped) >= limit:
            break
        if row is None:
            skipped.append({"row": line, "id": "", "reason": err})
            continue
        rid = str(_pick(row, cols["id"]) or f"row{line}")
        try:
            item = _item(row, rid, line, format, cols, rubric, root, image_rewrites, allowed_image_dirs, lo, hi)
        except (RecordError, ValueError, TypeError, KeyError) as e:
            skipped.append({"row": line, "id": rid, "reason": str(e)})
            continue
        # MT-Bench has one row per human vote on the same pair: keep each, with a unique id
        n = seen.get(item.id, 0)
        seen[item.id] = n + 1
        if n:
            item.id = f"{item.id}#{n + 1}"
            item.request = replace(item.request, id=item.id)
        items.append(item)
    return Benchmark(path.stem, format, items, skipped, str(path), len(items) + len(skipped))


def _item(
    row: dict[str, Any], rid: str, line: int, fmt: str, cols: dict[str, list[str]], rubric: Rubric | None,
    root: Path, rewrites: dict[str, str] | None, allowed: list[str | Path] | None, lo: float, hi: float,
) -> BenchItem:
    instruction = _pick(row, cols["instruction"])
    response = _pick(row, cols["response"])
    response_b = _pick(row, cols["response_b"])
    if fmt == "mtbench" and "conversation_a" in row:
        t = _mtbench_turns(row, row.get("turn", 1))
        if t is None:
            raise ValueError(f"conversation_a/conversation_b lack turn {row.get('turn', 1)}")
        instruction, response, response_b = t
        rid = f"{rid}-{row.get('model_a')}-{row.get('model_b')}-t{row.get('turn', 1)}"
    if instruction is None:
        raise ValueError(f"missing instruction (looked for {cols['instruction']})")
    if response is None:
        raise ValueError(f"missing response (looked for {cols['response']})")

    gold_raw = _pick(row, cols["gold"])
    if gold_raw is None:
        raise ValueError(f"missing gold label (looked for {cols['gold']})")
    relative = response_b is not None
    human: list[float] = []
    if relative:
        gold: float | str | None = normalize_preference(gold_raw)
        if gold is None:
            raise ValueError(f"unreadable preference {gold_raw!r} (want A, B or tie)")
    else:
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

    images = ()
    image_value = _pick(row, cols["image"]) if cols["image"] else None
    if image_value is not None:
        # Relative paths must stay inside the image root (published rows climb out with '../');
        # an absolute path written in the file is the user's own choice unless they set `allowed`.
        bounds = allowed
        if bounds is None and isinstance(image_value, str) and Path(image_value).is_absolute() and not rewrites:
            bounds = []
        images = (resolve_image(image_value, root=root, rewrites=rewrites, allowed=bounds),)
    elif fmt in VISION_FORMATS:
        raise ValueError(f"missing image (looked for {cols['image']})")

    if rubric is None:
        crit = _pick(row, cols["criteria"])
        if crit is not None:
            descs = tuple(str(_pick(row, cols[f"score{i}"]) or "") for i in range(1, 6))
            rb = Rubric(str(crit), descs if all(descs) else ())
        else:
            rb = DEFAULT_RUBRIC
    else:
        rb = rubric
    if not relative and not rb.complete:
        rb = Rubric(rb.criteria, DEFAULT_RUBRIC.score_descriptions)
    ref = _pick(row, cols["reference"])
    request = JudgeRequest(
        instruction=str(instruction), response=str(response), rubric=rb,
        response_b=str(response_b) if relative else None, reference_answer=str(ref) if ref is not None else None,
        images=images, id=rid, mode="relative" if relative else "absolute",
    )
    caption = _pick(row, cols["caption"]) if cols["caption"] else None
    model = _pick(row, cols["model"])
    model_b = _pick(row, cols["model_b"])
    return BenchItem(
        id=rid, request=request, gold=gold, category=str(_pick(row, cols["category"]) or ""),
        caption=str(caption) if caption is not None else None,
        model=str(model) if model is not None else None, model_b=str(model_b) if model_b is not None else None,
        human_scores=human if len(human) > 1 else [], row=line,
    )
