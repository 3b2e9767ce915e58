"""Training rows -> (JudgeRequest, target) examples.

Rows are read by `vlm_judge.inputs` (the one row reader: every file type and row shape it knows,
one image policy, one RowError); this module adds the training target. The row shapes a judge is
trained on:

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
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlm_judge import inputs
from vlm_judge.inputs import InputOptions, Row, RowError
from vlm_judge.parse import parse_output
from vlm_judge.prompts import format_target, swapped
from vlm_judge.records import JudgeRequest, Verdict

log = logging.getLogger("vlm_judge.train")

__all__ = ["Example", "LoadReport", "RowContext", "RowError", "augment", "load_examples", "row_to_examples",
           "split_heldout", "split_prompt", "swap_ab_text", "swap_example"]


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


def describe(e: RowError) -> str:
    """A row error as the training report words it: 'missing field: orig_score (need 1..5, got 9)'."""
    if e.kind == "missing field" and e.field:
        rest = e.message.removeprefix("missing or empty").strip().strip("()")
        return f"missing field: {e.field}" + (f" ({rest})" if rest else "")
    return e.message if e.message.lower().startswith(e.kind) else f"{e.kind}: {e.message}"


@dataclass
class LoadReport:
    """What happened to the rows: how many became examples and why the others were skipped."""

    rows: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def skip(self, source: str, reason: str | RowError) -> None:
        if isinstance(reason, RowError):
            key, reason = reason.kind, describe(reason)
        else:
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


def split_prompt(text: str) -> dict[str, str]:
    """Split a rendered Prometheus-style prompt into its sections, and say which mode it is."""
    parts = inputs.split_prompt(text)
    return {"mode": "relative" if "response_b" in parts else "absolute", **parts}


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

    def input_options(self) -> InputOptions:
        # header + integrity check only: a dataset of 100k images is checked in seconds, and a
        # file that still fails to decode is skipped at training time
        return InputOptions(image_root=self.image_root, image_rewrites=dict(self.image_rewrites),
                            allowed=self.allowed_image_dirs, check_images="verify" if self.check_images else False,
                            duplicate_ids="keep")


def _target(row: Row, mode: str) -> tuple[str, Verdict]:
    """(feedback, gold verdict) of a row: its feedback and score/preference columns, else the
    parsed `output` (the published "feedback [RESULT] N", or a conversation's gpt turn)."""
    fb_col, feedback = row.pick("feedback")
    gold_col, gold = row.pick("gold")
    output = row.get("output")
    if isinstance(output, str) and (feedback is None or gold is None):
        parsed = parse_output(output, mode)
        if parsed.ok:
            feedback = feedback if feedback is not None else parsed.feedback
            gold = gold if gold is not None else parsed.verdict
        elif row.format.name == "conversation":
            raise RowError(f"gpt turn has no readable verdict ({parsed.reason})", field="conversations",
                           kind="unparseable target")
    verdict: Verdict
    if mode == "absolute":
        try:
            verdict = int(float(gold)) if gold is not None and not isinstance(gold, bool) else None
        except (TypeError, ValueError):
            verdict = None
        if verdict not in (1, 2, 3, 4, 5):
            raise RowError(f"need 1..5, got {gold!r}", field=gold_col, kind="missing field")
    else:
        pref = gold.strip().upper().replace("RESPONSE ", "") if isinstance(gold, str) else gold
        if pref not in ("A", "B"):
            col = next((c for c in row.columns.get("gold", ()) if "prefer" in c), gold_col)
            raise RowError(f"need 'A' or 'B', got {pref!r}", field=col, kind="missing field")
        verdict = pref
    if feedback is None or not str(feedback).strip():
        raise RowError("missing or empty", field=fb_col)
    return str(feedback), verdict


def row_to_examples(row: Row, source: str, ctx: RowContext, data_dir: Path,
                    opts: InputOptions | None = None) -> list[Example]:
    """One row -> its example(s) before augmentation; raises RowError naming what is wrong."""
    if row.error is not None:
        raise row.error
    mode = "relative" if inputs.is_pairwise(row) else "absolute"
    if ctx.mode not in ("mixed", mode):
        return []
    feedback, verdict = _target(row, mode)  # before the images: a row without a target needs no image
    if ctx.kind == "text" and row.get("image") is not None:
        raise RowError("a text judge (kind=text) cannot see images", kind="image row")
    req = inputs.to_request(row, opts or ctx.input_options(), data_dir)
    if not row.has_id:
        req = replace(req, id=source)
    return [Example(req, format_target(feedback, verdict), verdict, source)]


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
    opts = ctx.input_options()
    out: list[Example] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"training data file not found: {p}")
        root = opts.root_for(p.resolve())
        for row in inputs.iter_rows(p, opts):
            if max_rows is not None and report.rows >= max_rows:
                break
            report.rows += 1
            source = f"{p.name}:{row.index}"
            try:
                exs = row_to_examples(row, source, ctx, root, opts)
            except RowError as e:
                if on_bad_row == "fail":
                    raise RowError(f"{source}: {describe(e)}", kind=e.kind) from e
                report.skip(source, e)
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
