"""Exporters: filtered examples -> dataset files that `vlm-judge train` and `vlm-judge score` read.

Formats (one file each in the output folder, plus `export_info.json`):

- `jsonl` -> `perception_collection.jsonl`: the published Perception Collection schema (`image`,
  `instruction` = the full rendered judge prompt, `output` = the training target, `orig_*` parts,
  `orig_score` as a string like the published rows) plus our `id`. Images are copied (hard-linked
  when possible) into `images/` and referenced by relative path, so the folder is self-contained
  and the loaders' default image root (the data file's folder) finds them.
- `parquet` -> `perception_collection.parquet`: the same rows as a Hugging Face `datasets` parquet
  file whose `image` column is an `Image` feature holding the encoded bytes
  (`datasets.load_dataset("parquet", ...)` decodes it; our loaders read the bytes).
- `feedback_collection` -> `feedback_collection.jsonl`: text-only Feedback Collection rows; the
  image is replaced by its caption (`meta['caption']`, else `SourceImage.context`) through
  text_judge's caption bridge, so a text judge trains on exactly the layout it is scored with.
  Rows whose image has no caption are skipped and listed in export_info.json.
- `pairwise` -> `pairwise.jsonl`: Preference-Collection-style pairs of two graded responses to one
  instruction with different scores, in the schema `train/data.py` and `vlm_judge/inputs.py` read
  (`orig_response_A`, `orig_response_B`, `orig_preference`, `orig_feedback`, rubric and reference),
  the winner's position drawn per pair from a seed (or both orders).

Every prompt is rendered by `vlm_judge.prompts.render` and every target built by
`vlm_judge.prompts.format_target`: the renderer the scorer and the trainer use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from perception_collection.filters import score_histogram
from perception_collection.rows import SCORES, Example
from vlm_judge import __version__
from vlm_judge.prompts import format_target, render
from vlm_judge.records import ImageRef, JudgeRequest, Rubric

log = logging.getLogger("perception_collection.export")

FORMATS = ("jsonl", "parquet", "feedback_collection", "pairwise")
FILES = {
    "jsonl": "perception_collection.jsonl",
    "parquet": "perception_collection.parquet",
    "feedback_collection": "feedback_collection.jsonl",
    "pairwise": "pairwise.jsonl",
}
PERCEPTION_COLUMNS = (
    "image", "instruction", "output", "orig_instruction", "orig_response", "orig_reference_answer",
    "orig_criteria", *(f"orig_score{i}_description" for i in SCORES), "orig_feedback", "orig_score",
)

# A verdict the teacher left at the end of its feedback: format_target adds the verdict itself.
_TRAILING_VERDICT = re.compile(r"(\s*(So\s+the\s+overall\s+score\s+is\s+\d\.?|\[RESULT\]\s*\d))+\s*$", re.I)


def clean_feedback(feedback: str) -> str:
    """Feedback without a trailing verdict sentence (the target appends the verdict in both forms)."""
    return _TRAILING_VERDICT.sub("", feedback).strip()


def _rubric_columns(rubric: Rubric) -> dict[str, str]:
    out = {"orig_criteria": rubric.criteria}
    out.update({f"orig_score{i}_description": d for i, d in zip(SCORES, rubric.score_descriptions)})
    return out


def caption_of(ex: Example) -> str:
    """The text that stands in for the image in the text-only export: `meta['caption']` when the
    source provides one (a caption without task answers), else `SourceImage.context`."""
    cap = ex.image.meta.get("caption") if isinstance(ex.image.meta, dict) else None
    return str(cap) if isinstance(cap, str) and cap.strip() else ex.image.context


def perception_row(ex: Example, *, template: str = "default", image: str | None = None) -> dict[str, Any]:
    """One graded example as a published-schema Perception Collection row (plus `id`).

    image: the value for the `image` column (default: the example's image path).
    """
    req = JudgeRequest(
        instruction=ex.instruction.instruction, response=ex.response.response, rubric=ex.rubric.rubric,
        reference_answer=ex.instruction.reference_answer or None, images=(ImageRef(path=ex.image.path),), id=ex.id,
    )
    feedback = clean_feedback(ex.response.feedback)
    row: dict[str, Any] = {
        "image": ex.image.path if image is None else image,
        "instruction": render(req, template).user,
        "output": format_target(feedback, ex.response.score),
        "orig_instruction": ex.instruction.instruction,
        "orig_response": ex.response.response,
        "orig_reference_answer": ex.instruction.reference_answer,
        **_rubric_columns(ex.rubric.rubric),
        "orig_feedback": feedback,
        "orig_score": str(ex.response.score),
        "id": ex.id,
    }
    return row


def pair_row(
    pair_id: str, image: str, instruction: str, rubric: Rubric, chosen: str, rejected: str, feedback_chosen: str,
    feedback_rejected: str, chosen_first: bool, reference_answer: str | None = None, template: str = "default",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One pairwise row in the schema the trainer and the scorer read (`orig_response_A/B`,
    `orig_preference`), with `instruction` = the rendered relative prompt and `output` = the target.

    The comparison feedback states what each response does, in the order they appear, so that the
    trainer's position swap (which exchanges 'Response A'/'Response B') keeps it true.
    """
    a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
    fa, fb = (feedback_chosen, feedback_rejected) if chosen_first else (feedback_rejected, feedback_chosen)
    winner = "A" if chosen_first else "B"
    feedback = f"Response A: {clean_feedback(fa)} Response B: {clean_feedback(fb)}"
    req = JudgeRequest(instruction=instruction, response=a, response_b=b, rubric=rubric, mode="relative",
                       reference_answer=reference_answer or None, images=(ImageRef(path=image),), id=pair_id)
    row: dict[str, Any] = {
        "id": pair_id,
        "image": image,
        "instruction": render(req, template).user,
        "output": format_target(feedback, winner),
        "orig_instruction": instruction,
        "orig_response_A": a,
        "orig_response_B": b,
        "orig_reference_answer": reference_answer or "",
        **_rubric_columns(rubric),
        "orig_feedback": feedback,
        "orig_preference": winner,
    }
    row.update(extra or {})
    return row


def pairwise_rows(
    examples: Sequence[Example], *, template: str = "default", order: str = "random", seed: int = 0,
    min_score_gap: int = 1, image_of: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Pairs of graded responses to the same instruction whose scores differ by >= min_score_gap.

    order: 'random' (the winner's position drawn per pair from `seed` and the pair id, so it does not
    depend on row order) or 'both' (each pair in both orders). image_of: {source path: value to write}.
    """
    if order not in ("random", "both"):
        raise ValueError(f"pair order must be 'random' or 'both', got {order!r}")
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.group_id, []).append(ex)
    rows = []
    for gid, group in groups.items():
        group = sorted(group, key=lambda e: -e.response.score)
        for hi, lo in combinations(group, 2):
            if hi.response.score - lo.response.score < min_score_gap:
                continue
            pid = f"{gid}/s{hi.response.score}-s{lo.response.score}"
            image = (image_of or {}).get(hi.image.path, hi.image.path)
            if order == "both":
                orders = [(True, pid + "/AB"), (False, pid + "/BA")]
            else:
                orders = [(random.Random(f"{seed}:{pid}").random() < 0.5, pid)]
            for chosen_first, rid in orders:
                rows.append(pair_row(
                    rid, image, hi.instruction.instruction, hi.rubric.rubric, hi.response.response, lo.response.response,
                    hi.response.feedback, lo.response.feedback, chosen_first, hi.instruction.reference_answer, template,
                    {"orig_score_A": str((hi if chosen_first else lo).response.score),
                     "orig_score_B": str((lo if chosen_first else hi).response.score)},
                ))
    return rows


# ---- files ------------------------------------------------------------------------------------


def _safe_name(image_id: str, suffix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"
    return name if name.lower().endswith(suffix.lower()) else name + suffix


def copy_images(paths: Sequence[tuple[str, str]], out_dir: Path) -> dict[str, str]:
    """Put each (image_id, path) into out_dir/images/ (hard link, else copy); returns
    {source path: relative path}. Names come from the image id; clashes get a hash suffix."""
    folder = out_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    used: dict[str, str] = {}
    for image_id, src in paths:
        if src in out:
            continue
        name = _safe_name(image_id, Path(src).suffix or ".png")
        if used.get(name, src) != src:
            stem, suf = os.path.splitext(name)
            name = f"{stem}-{hashlib.sha1(src.encode()).hexdigest()[:8]}{suf}"
        used[name] = src
        dest = folder / name
        if not (dest.exists() and dest.stat().st_size == Path(src).stat().st_size):
            dest.unlink(missing_ok=True)
            try:
                os.link(src, dest)
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(src, dest)
        out[src] = f"images/{name}"
    return out


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a crash never leaves a half-written export under the real name


def write_parquet(path: Path, rows: Sequence[dict[str, Any]], out_dir: Path, batch_size: int = 256) -> None:
    """Rows -> a `datasets` parquet file whose `image` column is an Image feature with the bytes.

    Written in batches with pyarrow (the `datasets` feature metadata in the schema), so memory
    holds one batch of images at a time, not the dataset.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value

    columns = [c for c in (rows[0].keys() if rows else (*PERCEPTION_COLUMNS, "id"))]
    features = Features({c: (Image() if c == "image" else Value("string")) for c in columns})
    schema = features.arrow_schema
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, max(len(rows), 1), batch_size):
            batch = []
            for r in rows[start:start + batch_size]:
                img = Path(r["image"])
                img = img if img.is_absolute() else out_dir / img
                batch.append({**{c: str(r[c]) for c in columns if c != "image"},
                              "image": {"bytes": img.read_bytes(), "path": Path(r["image"]).name}})
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    os.replace(tmp, path)


def export_all(
    examples: list[Example], out_dir: Path, formats: Sequence[str], *, template: str = "default",
    pair_order: str = "random", seed: int = 0, min_score_gap: int = 1, extra_pairs: Sequence[dict[str, Any]] = (),
) -> dict[str, str]:
    """Write the requested formats into out_dir; returns {format: file path}.

    extra_pairs: pairwise rows made elsewhere (e.g. the noisy-instruction stage) whose `image` is a
    local path; their images are copied like the others and the rows appended to pairwise.jsonl.
    """
    from text_judge.feedback_collection import perception_to_feedback

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {list(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    info: dict[str, Any] = {"template": template, "formats": {}, "skipped": {}}
    needs_images = any(f in formats for f in ("jsonl", "parquet", "pairwise"))
    image_of: dict[str, str] = {}
    if needs_images:
        srcs = [(ex.image.image_id, ex.image.path) for ex in examples]
        if "pairwise" in formats:
            srcs += [(str(r.get("image_id") or Path(r["image"]).stem), str(r["image"])) for r in extra_pairs]
        image_of = copy_images(srcs, out_dir)
    rows = [perception_row(ex, template=template, image=image_of.get(ex.image.path)) for ex in examples]
    for fmt in formats:
        path = out_dir / FILES[fmt]
        if fmt == "jsonl":
            _write_jsonl(path, rows)
            n = len(rows)
        elif fmt == "parquet":
            write_parquet(path, rows, out_dir)
            n = len(rows)
        elif fmt == "feedback_collection":
            errors: dict[str, str] = {}
            # the rows already rendered, with the source image path (it names the image in skip reasons)
            src_rows = [{**r, "image": ex.image.path} for r, ex in zip(rows, examples)]
            # keyed by row, not by image path: one file may carry different contexts (one per question)
            context = {ex.id: caption_of(ex) for ex in examples}
            sources = sorted({ex.image.source for ex in examples})
            fc = list(perception_to_feedback(src_rows, lambda r, c=context: c.get(r["id"]),
                                             f"source context ({', '.join(sources)})", template, errors))
            _write_jsonl(path, fc)
            n = len(fc)
            if errors:
                info["skipped"][fmt] = errors
                log.warning("feedback_collection: %d rows skipped (first: %s)", len(errors), next(iter(errors.items())))
        else:
            pairs = pairwise_rows(examples, template=template, order=pair_order, seed=seed,
                                  min_score_gap=min_score_gap, image_of=image_of)
            pairs += [{**r, "image": image_of.get(str(r["image"]), r["image"])} for r in extra_pairs]
            _write_jsonl(path, pairs)
            n = len(pairs)
        written[fmt] = str(path)
        info["formats"][fmt] = {"file": FILES[fmt], "rows": n}
    info["version"] = __version__
    info["score_histogram"] = {str(s): n for s, n in score_histogram(examples).items()}
    (out_dir / "export_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return written
