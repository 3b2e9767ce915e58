"""`build(cfg)`: sources -> seeds -> rubrics -> instructions -> responses -> examples -> filters -> export.

The three teacher stages stream (`generate`): one pool of `teacher.concurrency` calls in flight
across them, each item's children queued as soon as it is saved. The filters and exports need the
whole set, so they run once every response is in.

The run folder holds everything a run needs to resume and to be understood later:

    recipe.yaml          the resolved config            version.json   package version
    sources.jsonl        the validated images           images/        MMMU images, RGB conversions
    rubrics.jsonl  instructions.jsonl  responses.jsonl  (appended per item; a re-run skips done items)
    teacher_cache.jsonl  every teacher generation by request hash (a re-run repeats no call)
    drops/<stage>.jsonl  what each stage/filter left out this run, and why;  drops.jsonl: all of them
    export/              the exported datasets          summary.json   the numbers printed at the end
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from perception_collection import stage_instructions, stage_responses, stage_rubrics
from perception_collection.config import BuildConfig
from perception_collection.rows import (
    SCORES,
    Drop,
    Example,
    GradedResponse,
    ImageRubric,
    Instruction,
    SeedRubric,
    SourceImage,
    Teacher,
)
from perception_collection.sources import load_source
from perception_collection.store import Flow, JsonlWriter, StageFile, StageResult, read_jsonl, run_lock
from vlm_judge.redact import redact_text, redact_urls


@dataclass
class BuildSummary:
    """The numbers of one build (also written to `<run>/summary.json`)."""

    run_dir: str
    counts: dict[str, int] = field(default_factory=dict)
    """Records per stage: images, rubrics, instructions, responses, examples, kept (after filters)."""
    resumed: dict[str, int] = field(default_factory=dict)
    """Items per stage found done from an earlier run (no teacher call spent on them)."""
    score_histogram: dict[int, int] = field(default_factory=dict)
    """Kept examples per score."""
    words_by_score: dict[int, float] = field(default_factory=dict)
    """Mean response length in words per score (kept examples): should be flat."""
    drops: dict[str, dict[str, int]] = field(default_factory=dict)
    """stage or filter -> reason -> count."""
    teacher: dict[str, int] = field(default_factory=dict)
    """calls, cache_hits, errors, parse_failures, prompt_tokens, completion_tokens."""
    exports: dict[str, str] = field(default_factory=dict)
    """format -> path written."""
    noisy_pairs: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (what summary.json holds)."""
        return asdict(self)

    def format_table(self) -> str:
        """The human-readable summary printed at the end of a build."""
        lines = [f"run folder: {self.run_dir}   ({self.seconds:.1f} s)", "", "stage          records   resumed"]
        for k, v in self.counts.items():
            r = self.resumed.get(k)
            lines.append(f"  {k:<13}{v:>8}   {'' if r is None else r:>7}")
        if self.noisy_pairs is not None:
            lines.append(f"  {'noisy pairs':<13}{self.noisy_pairs:>8}")
        lines += ["", "score   examples   mean words"]
        for s in SCORES:
            lines.append(f"  {s:<6}{self.score_histogram.get(s, 0):>9}   {self.words_by_score.get(s, 0.0):>10.1f}")
        lines += ["", "dropped (stage / filter: count x reason)"]
        if not any(self.drops.values()):
            lines.append("  nothing")
        for stage, reasons in self.drops.items():
            for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]:
                lines.append(f"  {stage}: {n} x {reason}")
        t = self.teacher
        if not t:
            lines += ["", "teacher: no model calls (this teacher keeps no call counts)"]
        else:
            lines += ["", f"teacher: {t.get('calls', 0)} calls, {t.get('cache_hits', 0)} cache hits, "
                          f"{t.get('errors', 0)} failed calls, {t.get('parse_failures', 0)} unparseable outputs, "
                          f"{t.get('oversize', 0)} oversize outputs refused, "
                          f"{t.get('prompt_tokens', 0)} prompt + {t.get('completion_tokens', 0)} completion tokens"]
        for fmt, path in self.exports.items():
            lines.append(f"export {fmt}: {path}")
        return "\n".join(lines)


_MEASURE = re.compile(r"\d+\.\d+")
_SLOT = "\x00"


def _reason_head(reason: str) -> tuple[str, list[float]]:
    """Group drop reasons that differ only in details (paths, request numbers, URLs, measured
    ratios, quoted text) for the table: (the reason with a slot per measured number, the numbers).
    drops.jsonl keeps every reason in full."""
    r = re.sub(r"\s*\((?:request \d+|https?://[^)]*)\)", "", reason)
    r = re.sub(r"(?<=[\s'\"])/[^\s'\"]+?(?=[:'\"\s]|$)", "<path>", r)
    r = r.split(": '")[0].split(' "')[0][:120]
    return _MEASURE.sub(_SLOT, r), [float(x) for x in _MEASURE.findall(r)]


def _fill_slots(head: str, values: list[list[float]]) -> str:
    """Each measured number of a grouped reason as the range seen ("covers 0.081-0.117 of the image")."""
    parts = head.split(_SLOT)
    out = parts[0]
    for i, rest in enumerate(parts[1:]):
        seen = [v[i] for v in values if i < len(v)]
        lo, hi = min(seen), max(seen)
        out += (f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}") + rest
    return out


def _drop_table(drops: list[Drop]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, list[list[float]]]] = {}
    for d in drops:
        head, values = _reason_head(redact_text(d.reason))
        table.setdefault(d.stage, {}).setdefault(head, []).append(values)
    return {stage: {_fill_slots(h, vs): len(vs) for h, vs in heads.items()} for stage, heads in table.items()}


def _export_skips(info_path: Path) -> list[Drop]:
    """Rows an exporter could not write in one format (e.g. no caption for the text-only export),
    as drops of stage 'export:<format>' (the other formats still have them)."""
    try:
        skipped = json.loads(info_path.read_text()).get("skipped") or {}
    except (OSError, ValueError):
        return []
    return [Drop(str(row_id), f"export:{fmt}", str(reason))
            for fmt, rows in skipped.items() if isinstance(rows, dict) for row_id, reason in rows.items()]


def resolved_recipe_yaml(cfg: BuildConfig) -> str:
    """The resolved recipe as written into the run folder: URLs keep scheme://host:port/path only
    (credentials in a base_url, or a key in its query, must not land in an output)."""
    import yaml

    return yaml.safe_dump(redact_urls(cfg.to_dict()), sort_keys=False)


def _write_run_info(cfg: BuildConfig, run_dir: Path) -> None:
    from vlm_judge import __version__

    text = resolved_recipe_yaml(cfg)
    old = run_dir / "recipe.yaml"
    if old.is_file() and old.read_text() != text:
        # a changed recipe is allowed (e.g. more images); keep the old one for the record
        old.replace(run_dir / f"recipe.{int(time.time())}.yaml")
    (run_dir / "recipe.yaml").write_text(text)
    (run_dir / "version.json").write_text(json.dumps(
        {"vlm_judge": __version__, "python": platform.python_version()}, indent=2) + "\n")


def join_examples(images: dict, rubrics: dict, instructions: dict, responses: list) -> list[Example]:
    """One Example per graded response whose instruction has all five scores, in id order."""
    by_ins: dict[str, list] = {}
    for r in responses:
        by_ins.setdefault(r.instruction_id, []).append(r)
    out = []
    for iid in sorted(by_ins):
        group = sorted(by_ins[iid], key=lambda r: r.score)
        ins = instructions.get(iid)
        if ins is None or [r.score for r in group] != list(SCORES):
            continue
        rub = rubrics.get(ins.rubric_id)
        img = images.get(ins.image_id)
        if rub is None or img is None:
            continue
        out += [Example(img, rub, ins, r) for r in group]
    return out


def generate(
    images: Sequence[SourceImage], seeds: Sequence[SeedRubric], teacher: Teacher, run_dir: Path, cfg: BuildConfig,
    progress: bool = True,
) -> tuple[StageResult[ImageRubric], StageResult[Instruction], StageResult[GradedResponse]]:
    """Rubrics per image -> instructions per rubric -> five responses per instruction, streamed:
    one pool of `cfg.teacher.concurrency` items in flight across the three stages, and an item's
    children queued the moment it is saved (a rubric's instructions do not wait for other images).
    Items found done on disk are skipped (their children still run); each stage's file and drops
    are those of `store.StageFile`. The dedups that need a whole set run where that set is: near-
    duplicate rubrics within an image's item, repeated instructions within a rubric's item."""
    files = (stage_rubrics.open_file(run_dir), stage_instructions.open_file(run_dir),
             stage_responses.open_file(run_dir))
    rubrics, instructions, responses = files
    flow = Flow(cfg.teacher.concurrency, progress)
    by_image = {im.image_id: im for im in images}

    def item(depth: int, file: StageFile, parent: Any, work: Callable[[Any], tuple[list, list[Drop]]],
             child: Callable[[Any], None]) -> None:
        """Queue `work(parent)` (or take its records from disk), then `child` of each record."""
        done = file.resume(parent)
        if done is not None:
            for rec in done:
                child(rec)
            return

        def then(result: tuple[list, list[Drop]] | None, err: BaseException | None) -> None:
            if err is not None:
                file.fail(parent, err)
                return
            records, drops = result  # type: ignore[misc]
            file.save(parent, records, drops)
            for rec in records:
                child(rec)

        flow.add(depth, lambda: work(parent), then, file.stage)

    def on_instruction(rubric: ImageRubric) -> Callable[[Instruction], None]:
        return lambda ins: item(2, responses, ins, lambda i: (stage_responses.responses_for_instruction(
            by_image[i.image_id], rubric, i, teacher, cfg), []), lambda _: None)

    def on_rubric(r: ImageRubric) -> None:
        item(1, instructions, r, lambda r: stage_instructions.instructions_for_rubric(
            by_image[r.image_id], r, teacher, cfg), on_instruction(r))

    try:
        for im in images:
            item(0, rubrics, im, lambda im: stage_rubrics.rubrics_for_image(im, seeds, teacher, cfg), on_rubric)
        flow.run()
    finally:
        for f in files:
            f.close()
    return rubrics.result(), instructions.result(), responses.result()


def build(cfg: BuildConfig, progress: bool = True, teacher: Teacher | None = None) -> BuildSummary:
    """Run (or resume) a build in `cfg.out` and return its summary. `teacher` overrides the one
    the config describes (tests, or a caller holding a model in memory). Raises RunLocked when
    another build is running in the same folder."""
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _build(cfg, run_dir, progress, teacher)


def _build(cfg: BuildConfig, run_dir: Path, progress: bool, teacher: Teacher | None) -> BuildSummary:
    from perception_collection.export import export_all
    from perception_collection.filters import apply_filters, score_histogram
    from perception_collection.seeds import load_seeds
    from perception_collection.teacher import make_teacher

    t0 = time.monotonic()
    _write_run_info(cfg, run_dir)
    summary = BuildSummary(run_dir=str(run_dir))
    all_drops: list[Drop] = []

    images, source_drops = load_source(cfg.source, run_dir)
    all_drops += source_drops
    with JsonlWriter(run_dir / "sources.jsonl", truncate=True) as f:
        for im in images:
            f.write(im.to_dict())
    seeds = load_seeds(cfg.seeds.path, cfg.seeds.categories)

    own_teacher = teacher is None
    teacher = teacher or make_teacher(cfg, run_dir)
    try:
        by_image = {im.image_id: im for im in images}
        rub, ins, res = generate(images, seeds, teacher, run_dir, cfg, progress)
        by_rubric = {r.rubric_id: r for r in rub.records}
        by_ins = {i.instruction_id: i for i in ins.records}
        all_drops += rub.drops + ins.drops + res.drops

        examples = join_examples(by_image, by_rubric, by_ins, res.records)
        kept, filter_drops = apply_filters(examples, cfg.filters)
        all_drops += filter_drops

        noisy_rows: list[dict] = []
        if cfg.noisy:
            from perception_collection.noisy import noisy_pairs

            seen: dict[str, tuple] = {}
            for ex in kept:  # one pair per instruction that survived the filters
                seen.setdefault(ex.group_id, (ex.image, ex.instruction))
            noisy_rows, noisy_drops = noisy_pairs(list(seen.values()), teacher, run_dir / "noisy.jsonl",
                                                  concurrency=cfg.teacher.concurrency)
            summary.noisy_pairs = len(noisy_rows)
            all_drops += noisy_drops

        # noisy-instruction pairs join the pairwise export (the only format with a place for them)
        summary.exports = export_all(kept, run_dir / "export", cfg.export, seed=cfg.seed, extra_pairs=noisy_rows)
        all_drops += _export_skips(run_dir / "export" / "export_info.json")
    finally:
        stats = getattr(teacher, "stats", None)
        if own_teacher and hasattr(teacher, "close"):
            teacher.close()
    summary.counts = {"images": len(images), "rubrics": len(rub.records), "instructions": len(ins.records),
                      "responses": len(res.records), "examples": len(examples), "kept": len(kept)}
    summary.resumed = {"rubrics": rub.resumed, "instructions": ins.resumed, "responses": res.resumed}
    hist = summary.score_histogram = score_histogram(kept)
    summary.words_by_score = {
        s: round(statistics.fmean([len(ex.response.response.split()) for ex in kept if ex.response.score == s]), 1)
        for s in SCORES if hist.get(s)
    }
    summary.drops = _drop_table(all_drops)
    summary.teacher = stats.to_dict() if stats is not None and hasattr(stats, "to_dict") else {}
    summary.seconds = round(time.monotonic() - t0, 2)

    with JsonlWriter(run_dir / "drops.jsonl", truncate=True) as f:
        for d in all_drops:
            f.write(redact_urls(d.to_dict()))
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if progress:
        print(summary.format_table(), flush=True)
    return summary


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary.json of a finished run."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


__all__ = ["BuildSummary", "build", "generate", "join_examples", "load_summary", "read_jsonl"]
