"""Quality filters over joined examples: what is left out of the exported dataset, and why.

Filters run in this order; each dropped example gets one `Drop` naming the filter and a reason a
person can act on:

1. `schema`        empty fields, score outside 1..5, incomplete rubric, ids that do not join up,
                   a missing image file, feedback shorter than `min_feedback_words`, duplicate ids.
2. `consistency`   the feedback states a verdict (``[RESULT] 3``, "a score of 3", "deserves a 3",
                   "3/5", ...) other than the gold score. Feedback is the training target's reasoning:
                   one that argues for a 3 and ends in a 5 teaches the judge to contradict itself.
3. `near_duplicate` (responses) two responses to one instruction are near-identical: the graded
                   ladder then has two rungs that cannot be told apart.
4. `length_balance` an instruction group whose longest response has more than `max_length_ratio`
                   times the words of its shortest: the whole group goes, so that length does not
                   predict the score (a judge would learn "longer is better").
5. `complete_group` with `require_all_scores`, groups that lost a response (or never had all five).
6. `near_duplicate` (instructions) near-identical instructions across the run (or per image):
                   the later group goes. Runs after 3-5 so the group kept in its place is a valid one.
7. `score_balance` each score ends with the same count (the minimum), incomplete groups giving way
                   first; `score_histogram` reports the result.

Near-duplicates are word-bigram Jaccard similarity >= threshold, found with an exact prefix
filter (rare shingles first) and a length bound, so thousands of texts take well under a second.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from perception_collection.rows import SCORES, Drop, Example
from vlm_judge.parse import parse_output

log = logging.getLogger("perception_collection.filters")


@dataclass
class FilterConfig:
    """Thresholds and switches of `apply_filters` (defaults suit teacher-written data)."""

    max_length_ratio: float = 3.0
    """Largest allowed (max words / min words) among the responses to one instruction; 0 = off."""
    response_dup_threshold: float = 0.9
    """Responses to one instruction at or above this bigram Jaccard similarity are near-duplicates.
    High on purpose: responses one detail apart are the point of a graded ladder."""
    instruction_dup_threshold: float = 0.7
    """Instructions at or above this similarity are near-duplicates; 1.0 = exact repeats only, >1 = off."""
    instruction_dedup_scope: str = "run"
    """'run' (across all images) or 'image' (only among one image's instructions; use it for templated
    VQA questions such as easy-vqa's, which repeat across images by design)."""
    min_feedback_words: int = 8
    """Feedback with fewer words is dropped (it cannot explain a score against a rubric)."""
    require_all_scores: bool = True
    """Keep only instruction groups with all five scores 1..5."""
    score_balance: bool = True
    """Make every score's count equal across the kept set (downsampling to the minimum)."""
    check_consistency: bool = True
    """Drop rows whose feedback states a different verdict than the gold score."""
    check_image_files: bool = True
    """Drop rows whose image file does not exist."""

    def __post_init__(self) -> None:
        if self.instruction_dedup_scope not in ("run", "image"):
            raise ValueError(f"instruction_dedup_scope must be 'run' or 'image', got {self.instruction_dedup_scope!r}")
        if self.max_length_ratio and self.max_length_ratio < 1:
            raise ValueError(f"max_length_ratio must be >= 1 (or 0 to turn it off), got {self.max_length_ratio}")
        for name in ("response_dup_threshold", "instruction_dup_threshold"):
            if not 0 < getattr(self, name):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_feedback_words < 0:
            raise ValueError("min_feedback_words must be >= 0")


# ---- text measures ----------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.U)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def length_ratio(texts: Sequence[str]) -> float:
    """max/min word count over `texts` (inf when one is empty and another is not; 1.0 for none)."""
    counts = [len(t.split()) for t in texts]
    if not counts or max(counts) == 0:
        return 1.0
    return math.inf if min(counts) == 0 else max(counts) / min(counts)


def shingles(text: str, n: int = 2) -> frozenset[str]:
    """Lower-cased word n-grams (a text shorter than n words is one shingle of all its words)."""
    w = _words(text)
    if len(w) < n:
        return frozenset([" ".join(w)]) if w else frozenset()
    return frozenset(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (two empty sets are identical: 1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _near_duplicates(texts: Sequence[str], threshold: float) -> list[tuple[int, float] | None]:
    """For each text: (index of the earlier kept text it nearly duplicates, similarity), or None.

    Exact for Jaccard >= threshold: two sets that similar share a shingle within the first
    |x| - ceil(t*|x|) + 1 of their shingles in a global rare-first order (prefix filtering), so only
    texts sharing a prefix shingle are compared, and only when their sizes are within the factor t.
    """
    sets = [shingles(t) for t in texts]
    freq = Counter(s for x in sets for s in x)
    order = [sorted(x, key=lambda s: (freq[s], s)) for x in sets]
    index: dict[str, list[int]] = defaultdict(list)
    empty_first: int | None = None
    out: list[tuple[int, float] | None] = []
    for i, (x, ordered) in enumerate(zip(sets, order)):
        if not x:  # empty texts duplicate each other and nothing else
            out.append((empty_first, 1.0) if empty_first is not None else None)
            empty_first = i if empty_first is None else empty_first
            continue
        prefix = ordered[: len(x) - math.ceil(threshold * len(x) - 1e-9) + 1]
        best: tuple[int, float] | None = None
        seen: set[int] = set()
        for s in prefix:
            for j in index[s]:
                if j in seen:
                    continue
                seen.add(j)
                y = sets[j]
                if min(len(x), len(y)) < threshold * max(len(x), len(y)):
                    continue  # the length bound: Jaccard <= small/large
                sim = jaccard(x, y)
                if sim >= threshold and (best is None or sim > best[1]):
                    best = (j, sim)
        out.append(best)
        if best is None:
            for s in prefix:
                index[s].append(i)
    return out


def dedup_texts(texts: Sequence[str], threshold: float) -> list[int]:
    """Indices of the texts to keep: the first of each near-duplicate cluster (word-bigram Jaccard
    similarity >= threshold with an earlier kept text), in input order."""
    return [i for i, d in enumerate(_near_duplicates(texts, threshold)) if d is None]


# ---- verdicts stated in feedback ----------------------------------------------------------------

_NUMS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_N = r"([1-5]|one|two|three|four|five)\b(?!\s*(?:-|\u2013|to|or)\s*\d)"
_EXTRA_VERDICTS = [
    # "a score of 3", "score of three"
    re.compile(r"\bscore\s+of\s+" + _N, re.I),
    # "deserves a 3", "earns a score of 4", "I would give it a 2", "merits a rating of 2"
    re.compile(
        r"\b(?:deserves?|earns?|merits?|warrants?|receives?|gets?|assign(?:s|ed)?|award(?:s|ed)?|gives?|given|"
        r"rated?|grade[sd]?)\s+(?:it\s+|this\s+(?:response\s+)?)?"
        # an article or a score word is required: "the response gives 4, not 5" reports a count
        r"(?:(?:an?\s+)?(?:score|rating|grade)\s+(?:of\s+)?|an?\s+)"
        + _N + r"(?=\s*(?:[.,;:!)]|$|\s(?:because|since|overall|here)\b))",
        re.I,
    ),
    # "3 out of 5" as a rating, not "3 out of 5 objects"
    re.compile(r"\b([1-5]|one|two|three|four|five)\s+out\s+of\s+(?:5|five)\b(?!\s*[\w-])", re.I),
]
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def stated_verdicts(feedback: str) -> list[tuple[int, str]]:
    """Scores the feedback itself states, each with the sentence stating it.

    Uses `vlm_judge.parse.parse_output` (the forms a judge's verdict takes) per sentence, plus prose
    forms the parser deliberately ignores in judge output ("a score of 3", "deserves a 3").
    Sentences about the reference answer are skipped ("the reference answer earns a 5" is no verdict).
    """
    out: list[tuple[int, str]] = []
    for sent in _SENTENCE.split(feedback):
        if not sent.strip() or "reference" in sent.lower():
            continue
        found: set[int] = set()
        parsed = parse_output(sent, "absolute")
        if parsed.ok and isinstance(parsed.verdict, int):
            found.add(parsed.verdict)
        for pat in _EXTRA_VERDICTS:
            for m in pat.finditer(sent):
                g = m.group(1).lower()
                found.add(_NUMS.get(g) or int(g))
        out.extend((v, sent.strip()) for v in sorted(found))
    return out


# ---- the filters ------------------------------------------------------------------------------


def _schema_problem(ex: Example, cfg: FilterConfig) -> str | None:
    r, ins, img = ex.response, ex.instruction, ex.image
    for what, value in (
        ("instruction", ins.instruction), ("reference answer", ins.reference_answer),
        ("response", r.response), ("feedback", r.feedback), ("image path", img.path),
    ):
        if not isinstance(value, str) or not value.strip():
            return f"{what} is empty"
    if not isinstance(r.score, int) or isinstance(r.score, bool) or r.score not in SCORES:
        return f"score must be an integer 1..5, got {r.score!r}"
    if not ex.rubric.rubric.complete:
        return "rubric has no five score descriptions"
    if r.instruction_id != ins.instruction_id or ins.rubric_id != ex.rubric.rubric_id \
            or ins.image_id != img.image_id or ex.rubric.image_id != img.image_id:
        return (f"ids do not join: response->{r.instruction_id}, instruction {ins.instruction_id}"
                f"->{ins.rubric_id}/{ins.image_id}, rubric {ex.rubric.rubric_id}->{ex.rubric.image_id}, "
                f"image {img.image_id}")
    n = len(r.feedback.split())
    if n < cfg.min_feedback_words:
        return f"feedback has {n} words, fewer than min_feedback_words={cfg.min_feedback_words}"
    if cfg.check_image_files and not os.path.isfile(img.path):
        return f"image file not found: {img.path}"
    return None


def _groups(examples: list[Example]) -> dict[str, list[Example]]:
    g: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        g[ex.group_id].append(ex)
    return g


def score_histogram(examples: Sequence[Example]) -> dict[int, int]:
    """Count of examples per score 1..5 (zeros included)."""
    c = Counter(ex.response.score for ex in examples)
    return {s: c.get(s, 0) for s in SCORES}


def drop_summary(drops: Sequence[Drop]) -> dict[str, int]:
    """Count of drops per stage/filter name, for the run summary."""
    return dict(Counter(d.stage for d in drops))


def apply_filters(examples: list[Example], cfg: FilterConfig) -> tuple[list[Example], list[Drop]]:
    """Filter the examples (see the module docstring for the order). Returns (kept, drops): every
    input example is in exactly one of them. Kept examples stay in input order."""
    drops: list[Drop] = []
    kept: list[Example] = []
    seen_ids: set[str] = set()

    # 1-2: per example
    for ex in examples:
        problem = _schema_problem(ex, cfg)
        if problem is None and ex.id in seen_ids:
            problem = f"duplicate id {ex.id!r} (an earlier row has it)"
        if problem is not None:
            drops.append(Drop(ex.id, "schema", problem))
            continue
        seen_ids.add(ex.id)
        if cfg.check_consistency:
            wrong = [(v, s) for v, s in stated_verdicts(ex.response.feedback) if v != ex.response.score]
            if wrong:
                v, sent = wrong[0]
                drops.append(Drop(ex.id, "consistency",
                                  f"feedback states score {v} ({sent[:80]!r}) but the gold score is {ex.response.score}"))
                continue
        kept.append(ex)

    # 3-5: per instruction group
    dropped: set[str] = set()
    for gid, group in _groups(kept).items():
        group = sorted(group, key=lambda e: e.response.score)
        dups = _near_duplicates([e.response.response for e in group], cfg.response_dup_threshold)
        for ex, dup in zip(group, dups):
            if dup is not None:
                other, sim = group[dup[0]], dup[1]
                drops.append(Drop(ex.id, "near_duplicate", f"response (score {ex.response.score}) is a near-duplicate of "
                                  f"{other.id} (score {other.response.score}, similarity {sim:.2f})"))
                dropped.add(ex.id)
        group = [e for e in group if e.id not in dropped]
        if cfg.max_length_ratio and len(group) > 1:
            ratio = length_ratio([e.response.response for e in group])
            if ratio > cfg.max_length_ratio:
                counts = {e.response.score: len(e.response.response.split()) for e in group}
                for ex in group:
                    drops.append(Drop(ex.id, "length_balance", f"group {gid}: response lengths {counts} (words per score) "
                                      f"differ by {ratio:.1f}x > max_length_ratio={cfg.max_length_ratio}"))
                    dropped.add(ex.id)
                continue
        if cfg.require_all_scores:
            have = sorted(e.response.score for e in group)
            if have != list(SCORES):
                for ex in group:
                    drops.append(Drop(ex.id, "complete_group", f"group {gid} has scores {have} after filtering; "
                                      "require_all_scores needs exactly one of each 1..5"))
                    dropped.add(ex.id)
    kept = [e for e in kept if e.id not in dropped]

    # 6: instructions across the run (or per image): later groups give way
    groups = _groups(kept)
    scopes: dict[str, list[str]] = defaultdict(list)
    for gid, group in groups.items():
        scopes["" if cfg.instruction_dedup_scope == "run" else group[0].image.image_id].append(gid)
    for gids in scopes.values():
        texts = [groups[g][0].instruction.instruction for g in gids]
        for gid, dup in zip(gids, _near_duplicates(texts, cfg.instruction_dup_threshold)):
            if dup is None:
                continue
            hint = " (use instruction_dedup_scope='image' for templated questions)" if cfg.instruction_dedup_scope == "run" else ""
            for ex in groups[gid]:
                drops.append(Drop(ex.id, "near_duplicate", f"instruction is a near-duplicate of group {gids[dup[0]]}'s "
                                  f"(similarity {dup[1]:.2f}, scope {cfg.instruction_dedup_scope}){hint}"))
                dropped.add(ex.id)
    kept = [e for e in kept if e.id not in dropped]

    # 7: equal count per score; rows of incomplete groups (then later groups) give way first
    if cfg.score_balance and kept:
        hist = score_histogram(kept)
        target = min(hist.values())
        if len(set(hist.values())) > 1:
            sizes = Counter(e.group_id for e in kept)
            order = sorted(range(len(kept)), key=lambda i: (sizes[kept[i].group_id] == len(SCORES), -i))
            excess = {s: hist[s] - target for s in SCORES}
            for i in order:
                ex = kept[i]
                if excess[ex.response.score] > 0:
                    excess[ex.response.score] -= 1
                    drops.append(Drop(ex.id, "score_balance", f"score {ex.response.score} has {hist[ex.response.score]} rows, "
                                      f"more than the rarest score's {target} (histogram {hist})"))
                    dropped.add(ex.id)
            kept = [e for e in kept if e.id not in dropped]
    log.info("filters: kept %d of %d; drops %s; scores %s", len(kept), len(examples), drop_summary(drops),
             score_histogram(kept))
    return kept, drops
