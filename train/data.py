"""Training rows -> (JudgeRequest, target) examples.

Reads the row shapes a judge is trained on, from JSON, JSONL or parquet:

- Perception / Feedback Collection rows (ours and the published ones): `orig_instruction`,
  `orig_response` (published eval rows: `original_response`), `orig_reference_answer`,
  `orig_criteria`, `orig_score1_description`..`orig_score5_description`, `orig_feedback`,
  `orig_score`, and `image` (Feedback Collection: no image). When `orig_feedback` is missing the
  published `output` column ("feedback [RESULT] N") is parsed instead.
- Pairwise rows (our pairwise export, Preference-Collection style): `orig_response_A` /
  `orig_response_B` (or `response_a` / `response_b`), `orig_preference` (or `winner`) in {A, B}.
- LLaVA conversation rows (the published Prometheus-Vision training file): `image`,
  `conversations` = [human: the rendered prompt, gpt: the target]. The prompt is split back into
  its sections so that it is re-rendered by *our* renderer: training and scoring then see the same
  prompt layout whatever wording the file was rendered with.

Every example's prompt is later rendered by `vlm_judge.prompts.render` and its target built by
`vlm_judge.prompts.format_target`. Bad rows raise RowError with a reason; `load_examples` skips
them with a count per reason (or fails on the first one, when asked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlm_judge.images import resolve_image
from vlm_judge.parse import parse_output
from vlm_judge.prompts import format_target, swapped
from vlm_judge.records import JudgeRequest, RecordError, Rubric, Verdict

log = logging.getLogger("vlm_judge.train")


class RowError(ValueError):
    """A row cannot become a training example; the message is the reason."""


@dataclass(frozen=True)
class Example:
    """One training/eval example: what the judge sees, what it should write, and the gold verdict."""

    request: JudgeRequest
    target: str
    """The full training target (feedback, then the verdict in both parser-readable forms)."""
    verdict: Verdict
    source: str
    """'file:row' of the row it came from (for error messages)."""
    augmented: str = ""
    """'' for the row as given, 'swap' for the position-swapped copy, 'noref' when the reference was dropped."""


@dataclass
class LoadReport:
    """What happened to the rows: how many became examples and why the others were skipped."""

    rows: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def skip(self, source: str, reason: str) -> None:
        key = reason.split(":")[0]
        self.skipped[key] += 1
        if len(self.first_errors) < 20:
            self.first_errors.append(f"{source}: {reason}")

    def summary(self) -> str:
        s = f"{self.rows} rows -> {self.examples} examples"
        if self.skipped:
            s += f"; skipped {sum(self.skipped.values())} rows: " + ", ".join(
                f"{k} x{v}" for k, v in self.skipped.most_common()
            )
        return s


# canonical field -> column names tried in order (orig_* first: in published rows `instruction`
# holds the whole rendered prompt, not the instruction)
ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("orig_instruction", "instruction"),
    "response": ("orig_response", "original_response", "response"),
    "response_a": ("orig_response_A", "orig_response_a", "response_A", "response_a"),
    "response_b": ("orig_response_B", "orig_response_b", "response_B", "response_b"),
    "reference_answer": ("orig_reference_answer", "reference_answer", "reference"),
    "criteria": ("orig_criteria", "criteria"),
    "feedback": ("orig_feedback", "feedback"),
    "score": ("orig_score", "score"),
    "preference": ("orig_preference", "preference", "winner", "orig_winner", "label"),
    "rubric": ("rubric", "orig_rubric"),
}


def _get(row: dict[str, Any], name: str) -> Any:
    for col in ALIASES.get(name, (name,)):
        v = row.get(col)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    return None


# ---- reading files ----------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a .json (list, or {"data": [...]}), .jsonl or .parquet file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training data file not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(p).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    elif p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"__error__": f"invalid JSON on line {n + 1}: {e}"}
    else:
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [])
        yield from data


# ---- the LLaVA conversation format --------------------------------------------------------------

# Section headers of the Prometheus family's prompts (ours keep the same headers).
_ABS_HEADERS = [
    ("instruction", r"###The instruction to evaluate:"),
    ("response", r"###Response to evaluate:"),
    ("reference_answer", r"###Reference Answer \(Score 5\):"),
    ("rubric", r"###Score Rubrics?:"),
]
_REL_HEADERS = [
    ("instruction", r"###The instruction to evaluate:"),
    ("response_a", r"###Response A:"),
    ("response_b", r"###Response B:"),
    ("reference_answer", r"###Reference Answer:"),
    ("rubric", r"###Score Rubrics?:"),
]
_ANY_HEADER = re.compile(
    r"\n*(###The instruction to evaluate:|###Response to evaluate:|###Response A:|###Response B:"
    r"|###Reference Answer(?: \(Score 5\))?:|###Score Rubrics?:|###Feedback:?)"
)


def split_prompt(text: str) -> dict[str, str]:
    """Split a rendered Prometheus-style prompt into its sections (instruction, response(s), ...)."""
    text = text.replace("<image>", "")
    relative = "###Response A:" in text and "###Response B:" in text
    out: dict[str, str] = {"mode": "relative" if relative else "absolute"}
    for name, header in _REL_HEADERS if relative else _ABS_HEADERS:
        m = re.search(header, text)
        if not m:
            continue
        rest = text[m.end():]
        nxt = _ANY_HEADER.search(rest)
        out[name] = (rest[: nxt.start()] if nxt else rest).strip()
    return out


def _conversation_row(row: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA conversation row -> a flat row with our canonical fields."""
    conv = row.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise RowError("missing field: conversations needs a human and a gpt turn")
    human = next((t.get("value", "") for t in conv if t.get("from") in ("human", "user")), "")
    gpt = next((t.get("value", "") for t in conv if t.get("from") in ("gpt", "assistant")), "")
    parts = split_prompt(human)
    if not parts.get("instruction"):
        raise RowError("missing field: the human turn has no '###The instruction to evaluate:' section")
    parsed = parse_output(gpt, parts["mode"])
    if not parsed.ok:
        raise RowError(f"unparseable target: gpt turn has no readable verdict ({parsed.reason})")
    flat: dict[str, Any] = {k: v for k, v in parts.items() if k != "mode"}
    flat["feedback"] = parsed.feedback
    if parts["mode"] == "relative":
        flat["preference"] = parsed.verdict
    else:
        flat["score"] = parsed.verdict
    for k in ("image", "images", "id"):
        if k in row:
            flat[k] = row[k]
    return flat


# ---- one row -> examples ------------------------------------------------------------------------


@dataclass
class RowContext:
    """How rows are turned into examples (from TrainConfig)."""

    mode: str = "mixed"
    image_root: str | None = None
    image_rewrites: dict[str, str] = field(default_factory=dict)
    allowed_image_dirs: list[str] | None = None
    kind: str = "vision"
    check_images: bool = True


def _rubric(row: dict[str, Any], mode: str) -> Rubric:
    text = _get(row, "rubric")
    if isinstance(text, str) and "Score 1" in text:
        return Rubric.from_text(text)
    if isinstance(text, dict):
        return Rubric.from_dict(text)
    criteria = _get(row, "criteria") or (text if isinstance(text, str) else None)
    if not criteria:
        raise RowError("missing field: orig_criteria")
    descs = tuple(row.get(f"orig_score{i}_description") or row.get(f"score{i}_description") or "" for i in range(1, 6))
    if mode == "absolute" and not all(d.strip() for d in descs):
        missing = [f"orig_score{i}_description" for i, d in enumerate(descs, 1) if not d.strip()]
        raise RowError(f"missing field: {', '.join(missing)}")
    if isinstance(criteria, str) and criteria.strip().startswith("[") and "]" in criteria:
        criteria = criteria.strip()[1 : criteria.strip().index("]")]
    return Rubric(criteria, descs if all(d.strip() for d in descs) else ())


def _images(row: dict[str, Any], ctx: RowContext, data_dir: Path) -> tuple:
    value = row.get("images") if row.get("images") is not None else row.get("image")
    if value is None or value == "" or value == []:
        return ()
    values = value if isinstance(value, list) else [value]
    root = ctx.image_root or str(data_dir)
    allowed = ctx.allowed_image_dirs
    if allowed is None:
        # default bound: the image root plus the targets of any rewrite the user configured
        allowed = [root] + [str(Path(v).parent if not v.endswith("/") else Path(v)) for v in ctx.image_rewrites.values()]
    refs = []
    for v in values:
        try:
            ref = resolve_image(v, root=root, rewrites=ctx.image_rewrites, allowed=allowed)
            if ctx.check_images:
                _check_image(ref)
        except RecordError as e:
            raise RowError(f"unreadable image: {e}") from e
        refs.append(ref)
    return tuple(refs)


def _check_image(ref: Any) -> None:
    """Cheap readability check (header and file integrity, no pixel decoding): a dataset of 100k
    images is checked in seconds. A file that still fails to decode is skipped at training time."""
    import io

    from PIL import Image

    try:
        with Image.open(ref.path if ref.path else io.BytesIO(ref.data)) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise RowError(f"unreadable image: cannot decode {ref!r}: {type(e).__name__}: {e}") from e


def row_to_examples(row: dict[str, Any], source: str, ctx: RowContext, data_dir: Path) -> list[Example]:
    """One row -> its example(s) before augmentation; raises RowError naming what is wrong."""
    if "__error__" in row:
        raise RowError(f"bad json: {row['__error__']}")
    if "conversations" in row:
        row = _conversation_row(row)
    is_pair = _get(row, "response_a") is not None or _get(row, "response_b") is not None
    mode = "relative" if is_pair else "absolute"
    if ctx.mode not in ("mixed", mode):
        return []
    instruction = _get(row, "instruction")
    if not instruction:
        raise RowError("missing field: orig_instruction")
    feedback = _get(row, "feedback")
    verdict: Verdict
    if mode == "absolute":
        response = _get(row, "response")
        if not response:
            raise RowError("missing field: orig_response")
        score = _get(row, "score")
        if feedback is None and isinstance(row.get("output"), str):
            parsed = parse_output(row["output"], "absolute")
            feedback, score = (parsed.feedback, parsed.verdict) if parsed.ok else (None, score)
        try:
            verdict = int(float(score)) if score is not None else None
        except (TypeError, ValueError):
            verdict = None
        if verdict not in (1, 2, 3, 4, 5):
            raise RowError(f"missing field: orig_score (need 1..5, got {score!r})")
        response_b = None
    else:
        response, response_b = _get(row, "response_a"), _get(row, "response_b")
        if not response or not response_b:
            raise RowError("missing field: " + ("orig_response_A" if not response else "orig_response_B"))
        pref = _get(row, "preference")
        if isinstance(pref, str):
            pref = pref.strip().upper().replace("RESPONSE ", "")
        if pref not in ("A", "B"):
            raise RowError(f"missing field: orig_preference (need 'A' or 'B', got {pref!r})")
        verdict = pref
        if feedback is None and isinstance(row.get("output"), str):
            parsed = parse_output(row["output"], "relative")
            feedback = parsed.feedback if parsed.ok else None
    if not feedback or not str(feedback).strip():
        raise RowError("missing field: orig_feedback")
    images = _images(row, ctx, data_dir)
    if images and ctx.kind == "text":
        raise RowError("image row: a text judge (kind=text) cannot see images")
    try:
        req = JudgeRequest(
            instruction=str(instruction), response=str(response), response_b=response_b, rubric=_rubric(row, mode),
            reference_answer=_get(row, "reference_answer"), images=images, id=str(row.get("id", source)), mode=mode,
        )
    except RecordError as e:
        raise RowError(f"invalid row: {e}") from e
    return [Example(req, format_target(str(feedback), verdict), verdict, source)]


# ---- augmentation -----------------------------------------------------------------------------

_AB = re.compile(r"\b(Response|response|Answer|answer|Assistant|assistant)\s+(A|B)\b|\b(A|B)(?=\s+(?:is|was|does|did|has|provides|gives)\b)")


def swap_ab_text(text: str) -> str:
    """Exchange mentions of Response A and Response B in feedback, for the swapped copy of a pair."""

    def sub(m: re.Match[str]) -> str:
        if m.group(2):
            return f"{m.group(1)} {'B' if m.group(2) == 'A' else 'A'}"
        return "B" if m.group(3) == "A" else "A"

    return _AB.sub(sub, text)


def swap_example(ex: Example) -> Example:
    """The pair in the other order: responses exchanged, verdict and feedback mentions flipped."""
    flipped = "B" if ex.verdict == "A" else "A"
    fb = re.sub(r"\s*So the better response is [AB]\.\n\[RESULT\] [AB]$", "", ex.target)
    return Example(swapped(ex.request), format_target(swap_ab_text(fb), flipped), flipped, ex.source, "swap")


def augment(examples: Iterable[Example], swap: bool, reference_dropout: float, seed: int) -> list[Example]:
    """Add swapped copies of pairs; drop the reference answer from a seeded random share of examples."""
    out: list[Example] = []
    for ex in examples:
        out.append(ex)
        if swap and ex.request.mode == "relative":
            out.append(swap_example(ex))
    if reference_dropout > 0:
        for i, ex in enumerate(out):
            r = random.Random(f"{seed}:{ex.source}:{ex.augmented}:{i}").random()
            if ex.request.reference_answer and r < reference_dropout:
                out[i] = replace(ex, request=replace(ex.request, reference_answer=None), augmented=ex.augmented + "noref")
    return out


# ---- files -> examples ------------------------------------------------------------------------


def load_examples(
    paths: Iterable[str | Path], ctx: RowContext, on_bad_row: str = "skip", max_rows: int | None = None,
    report: LoadReport | None = None,
) -> tuple[list[Example], LoadReport]:
    """All examples from the files; bad rows are skipped with a counted reason (or raise)."""
    report = report or LoadReport()
    out: list[Example] = []
    for path in paths:
        p = Path(path)
        for n, row in enumerate(read_rows(p)):
            if max_rows is not None and report.rows >= max_rows:
                break
            report.rows += 1
            source = f"{p.name}:{n}"
            try:
                exs = row_to_examples(row, source, ctx, p.resolve().parent)
            except RowError as e:
                if on_bad_row == "fail":
                    raise RowError(f"{source}: {e}") from e
                report.skip(source, str(e))
                continue
            out.extend(exs)
    report.examples = len(out)
    return out, report


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction by instruction (all responses to one instruction land on one side)."""
    if fraction <= 0:
        return examples, []

    def side(ex: Example) -> bool:
        key = f"{seed}:{ex.request.instruction}:{ex.request.image_key}".encode()
        return int(hashlib.sha1(key).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

    train = [e for e in examples if not side(e)]
    held = [e for e in examples if side(e)]
    if not held or not train:  # tiny data: fall back to the last rows so both sides exist
        k = max(1, int(len(examples) * fraction))
        return examples[:-k], examples[-k:]
    return train, held
