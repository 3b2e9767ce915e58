"""Input adapters: rows from user files -> JudgeRequests, one row at a time.

Files: JSONL, a JSON list, Hugging Face `datasets` files (parquet, arrow, or a `save_to_disk`
folder; an Image column arrives as encoded bytes). Row shapes, detected per row:

- ours: `id`?, `instruction`, `response`, `response_b`?, `reference_answer`?, `mode`?,
  `rubric` (a dict {criteria, score1_description..score5_description}, the rubric text form,
  or the name of a rubric in the rubric library), or flat `criteria` + `score1_description`..;
  `images` (a list) or `image` (one): paths, base64 / data URLs, or `datasets` Image dicts.
- Perception Collection / Feedback Collection (published): `orig_instruction`, `orig_response`
  or `original_response` (or `orig_response_A` + `orig_response_B` for pairwise rows),
  `orig_reference_answer`, `orig_criteria`, `orig_score1_description`..5, `image`.
- LLaVA conversation rows (the published Prometheus-Vision training file): `image`,
  `conversations` = [human: a rendered judge prompt, gpt: ...]; the prompt's sections are read back.

A column map renames the user's columns to ours before detection ({ours: theirs}).
A bad row never stops the reader: `read_requests` yields `(row_id, RowError)` for it and goes on.
The row id is the row's `id` when it has one, else its 0-based index in the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_judge.images import ImageError, check_image, resolve_image
from vlm_judge.jsonl import BadLine, iter_jsonl
from vlm_judge.records import ImageRef, JudgeRequest, RecordError, Rubric

# Columns of the published Perception / Feedback Collection schema that mark a row as one.
_PC_MARKERS = ("orig_instruction", "orig_criteria")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class RowError(RecordError):
    """A row cannot become a request. The message names the row and, when known, the field."""

    def __init__(self, row_id: str, message: str, field_name: str | None = None) -> None:
        self.row_id = row_id
        self.field = field_name
        where = f"row {row_id}" + (f", field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {message}")
        self.reason = message if not field_name else f"field '{field_name}': {message}"


@dataclass
class InputOptions:
    """How rows become requests."""

    image_root: str | Path | None = None
    """Relative image paths are resolved against this folder (default: the input file's folder)."""
    image_rewrites: dict[str, str] = field(default_factory=dict)
    """Path prefix rewrites applied first, e.g. {'../mmmu/': '/data/mmmu/'}."""
    allowed: list[str | Path] | None = None
    """Folders images may be read from (default: the image root and every rewrite target)."""
    column_map: dict[str, str] = field(default_factory=dict)
    """{our column: the file's column}, applied before the row shape is detected."""
    mode: str = "auto"
    """'auto' (relative when the row has a second response), 'absolute' or 'relative'."""
    default_rubric: Rubric | None = None
    """Used for rows that carry no rubric."""
    rubrics: dict[str, Rubric] = field(default_factory=dict)
    """Named rubrics a row may refer to by name in its `rubric` field."""
    check_images: bool = True
    """Decode every image when the row is read, so a corrupt file fails its row, not the batch."""
    max_pixels: int = 50_000_000
    """Images with more pixels are refused (decompression bombs)."""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "absolute", "relative"):
            raise ValueError(f"mode must be auto, absolute or relative, got {self.mode!r}")

    def allowed_folders(self, root: Path) -> list[Path]:
        if self.allowed is not None:
            return [Path(a).resolve() for a in self.allowed]
        out = [root.resolve()]
        for new in self.image_rewrites.values():
            # a rewrite target is where the user told us the images are: allow it
            out.append((root / new).resolve() if not Path(new).is_absolute() else Path(new).resolve())
        return out


# ---- files -> raw dict rows ---------------------------------------------------------------


def iter_raw_rows(path: str | Path) -> Iterator[dict[str, Any] | RowError]:
    """Yield each row of a file as a dict (a line that is not a JSON object yields a RowError)."""
    p = Path(path)
    if p.is_dir():
        yield from _iter_dataset(_load_datasets_dir(p))
        return
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        # blank lines are not rows; a bad line (encoding, JSON, number size, not an object, torn) is a bad row
        for lineno, row in iter_jsonl(p):
            yield RowError(str(lineno - 1), str(row)) if isinstance(row, BadLine) else row
    elif suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{p}: a .json input must hold a list of row objects")
        for i, row in enumerate(data):
            yield row if isinstance(row, dict) else RowError(str(i), "row is not a JSON object")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(p).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    elif suffix == ".arrow":
        from datasets import Dataset

        yield from _iter_dataset(Dataset.from_file(str(p)))
    else:
        raise ValueError(f"{p}: unsupported input type {suffix!r} (use .jsonl, .json, .parquet, .arrow or a datasets folder)")


def _load_datasets_dir(p: Path) -> Any:
    from datasets import load_from_disk

    ds = load_from_disk(str(p))
    if hasattr(ds, "keys"):  # a DatasetDict: one split, or refuse to guess
        if len(ds) != 1:
            raise ValueError(f"{p} holds splits {list(ds)}; point at one split's folder")
        ds = next(iter(ds.values()))
    return ds


def _iter_dataset(ds: Any) -> Iterator[dict[str, Any]]:
    # Read the underlying arrow table so an Image column stays {bytes, path} (never decoded here).
    table = ds.flatten_indices().data.table if getattr(ds, "_indices", None) is not None else ds.data.table
    for batch in table.to_batches(max_chunksize=256):
        yield from batch.to_pylist()


# ---- one raw row -> JudgeRequest ------------------------------------------------------------


def row_id_of(row: dict[str, Any], index: int) -> str:
    """The row's `id` when present and non-empty, else its index."""
    rid = row.get("id")
    return str(index) if rid is None or str(rid) == "" else str(rid)


def apply_column_map(row: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    """Rename the file's columns to ours ({ours: theirs}); a mapped column replaces ours."""
    if not column_map:
        return row
    out = dict(row)
    for ours, theirs in column_map.items():
        if theirs in row:
            out[ours] = row[theirs]
            if theirs != ours:
                out.pop(theirs, None)
    return out


def detect_schema(row: dict[str, Any]) -> str:
    """'perception' for published Perception/Feedback Collection rows, 'llava' for LLaVA
    conversation rows (the published Prometheus-Vision training file), else 'ours'."""
    if any(k in row for k in _PC_MARKERS):
        return "perception"
    return "llava" if isinstance(row.get("conversations"), list) else "ours"


# Section headers of Prometheus-family prompts (published and ours), in the order they may appear.
_SECTIONS = {
    "instruction": "###The instruction to evaluate:",
    "response": "###Response to evaluate:",
    "response_a": "###Response A:",
    "response_b": "###Response B:",
    "reference_answer": "###Reference Answer",  # '(Score 5):' in absolute prompts, ':' in relative ones
    "rubric": "###Score Rubric",  # 'Rubrics:' in absolute prompts, 'Rubric:' in relative ones
    "feedback": "###Feedback",
}
_HEADER = re.compile(r"^###(The instruction to evaluate|Response to evaluate|Response [AB]|Reference Answer"
                     r"(?: \(Score 5\))?|Score Rubrics?|Feedback)\s*:?[ \t]*\n?", re.M)


def split_prompt(text: str) -> dict[str, str]:
    """Split a rendered Prometheus-style judge prompt back into its parts (the inverse of render,
    up to wording): instruction, response or response_a/response_b, reference_answer, rubric."""
    text = text.replace("<image>", "")
    heads = list(_HEADER.finditer(text))
    out: dict[str, str] = {}
    for k, m in enumerate(heads):
        body = text[m.end(): heads[k + 1].start() if k + 1 < len(heads) else len(text)].strip()
        head = m.group(0)
        name = next((n for n, h in _SECTIONS.items() if head.startswith(h)), None)
        if name and name != "feedback":
            out[name] = body
    return out


def _conversation_row(row: dict[str, Any], rid: str) -> dict[str, Any]:
    """A LLaVA conversation row -> our flat row, from the sections of its human turn."""
    human = next((t.get("value", "") for t in row["conversations"] if isinstance(t, dict)
                  and t.get("from") in ("human", "user")), "")
    parts = split_prompt(human)
    if not parts.get("instruction"):
        raise RowError(rid, "the human turn has no '###The instruction to evaluate:' section", "conversations")
    flat: dict[str, Any] = {k: v for k, v in parts.items() if k not in ("response_a", "rubric")}
    if "response_a" in parts:
        flat["response"] = parts["response_a"]
    if parts.get("rubric"):
        flat["rubric"] = parts["rubric"] if "Score 1" in parts["rubric"] else {"criteria": parts["rubric"]}
    for k in ("image", "images", "id", "mode"):
        if k in row:
            flat[k] = row[k]
    return flat


def _text(row: dict[str, Any], rid: str, name: str, required: bool = True) -> str | None:
    v = row.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise RowError(rid, "missing or empty", name)
        return None
    if not isinstance(v, (str, int, float)):
        raise RowError(rid, f"must be text, got {type(v).__name__}", name)
    return str(v)


def _rubric(value: Any, rid: str, opts: InputOptions, name: str = "rubric") -> Rubric:
    try:
        if value is None:
            if opts.default_rubric is None:
                raise RowError(rid, "missing (and no default rubric was given)", name)
            return opts.default_rubric
        if isinstance(value, Rubric):
            return value
        if isinstance(value, dict):
            if "criteria" not in value:
                raise RowError(rid, "a rubric object needs 'criteria'", name)
            keys = [f"score{i}_description" for i in range(1, 6)]
            missing = [k for k in keys if not str(value.get(k) or "").strip()]
            if "score_descriptions" not in value and 0 < len(missing) < 5:
                raise RowError(rid, f"rubric lacks {', '.join(missing)} (it needs all of score1..score5)", name)
            return Rubric.from_dict(value)
        if isinstance(value, str):
            if value in opts.rubrics:
                return opts.rubrics[value]
            if "Score 1" not in value and len(value.split()) <= 3:
                raise RowError(rid, f"unknown rubric name {value!r} (known: {sorted(opts.rubrics) or 'none'})", name)
            return Rubric.from_text(value)
        raise RowError(rid, f"must be an object, text or a rubric name, got {type(value).__name__}", name)
    except RowError:
        raise
    except (RecordError, KeyError, TypeError) as e:
        raise RowError(rid, str(e), name) from e


def _flat_rubric(row: dict[str, Any], prefix: str, rid: str, opts: InputOptions) -> Rubric:
    """A rubric from flat columns `{prefix}criteria` + `{prefix}score{i}_description`."""
    criteria = row.get(prefix + "criteria")
    descs = [row.get(f"{prefix}score{i}_description") for i in range(1, 6)]
    present = [d for d in descs if d is not None and str(d).strip()]
    if criteria is None:
        return _rubric(None, rid, opts, prefix + "criteria")
    if present and len(present) != 5:
        missing = [f"{prefix}score{i}_description" for i, d in enumerate(descs, 1) if d is None or not str(d).strip()]
        raise RowError(rid, "missing or empty (a rubric needs all five score descriptions)", missing[0])
    try:
        return Rubric(str(criteria), tuple(str(d) for d in present))
    except RecordError as e:
        raise RowError(rid, str(e), prefix + "criteria") from e


def _decode_base64_image(s: str) -> bytes | None:
    """Bytes of a base64 / data-URL image string, or None when `s` is not one (a path, then)."""
    if s.startswith("data:"):
        head, _, payload = s.partition(",")
        if ";base64" not in head:
            return None
        s = payload
    elif len(s) < 64 or "/" in s[:64] and "." in s[-6:]:
        return None  # short strings and path-like strings are paths
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(_IMAGE_MAGIC) else None


def _images(row: dict[str, Any], rid: str, opts: InputOptions, root: Path) -> tuple[ImageRef, ...]:
    name = "images" if row.get("images") is not None else "image"
    value = row.get(name)
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    allowed = opts.allowed_folders(root)
    refs = []
    for k, v in enumerate(values):
        where = name if len(values) == 1 else f"{name}[{k}]"
        try:
            if isinstance(v, str):
                data = _decode_base64_image(v)
                ref = ImageRef(data=data) if data is not None else resolve_image(v, root, opts.image_rewrites, allowed)
            else:
                ref = resolve_image(v, root, opts.image_rewrites, allowed)
            if opts.check_images:
                check_image(ref, max_pixels=opts.max_pixels)  # header only: no pixels held for a row check
        except (ImageError, RecordError) as e:
            hint = ""
            if "outside the allowed folders" in str(e):
                hint = " (point it at your images with --image-rewrite OLD=NEW or --image-root)"
            raise RowError(rid, f"{e}{hint}", where) from e
        refs.append(ref)
    return tuple(refs)


def _mode(row: dict[str, Any], rid: str, opts: InputOptions, has_b: bool) -> str:
    mode = opts.mode
    row_mode = row.get("mode")
    if row_mode not in (None, ""):
        if row_mode not in ("absolute", "relative"):
            raise RowError(rid, f"must be 'absolute' or 'relative', got {row_mode!r}", "mode")
        if mode != "auto" and row_mode != mode:
            raise RowError(rid, f"row says {row_mode!r} but the run is --mode {mode}", "mode")
        mode = row_mode
    if mode == "auto":
        return "relative" if has_b else "absolute"
    if mode == "relative" and not has_b:
        raise RowError(rid, "missing or empty (relative grading needs a second response)", "response_b")
    if mode == "absolute" and has_b:
        raise RowError(rid, "absolute grading takes one response; drop response_b or use --mode relative", "response_b")
    return mode


def row_to_request(row: dict[str, Any], index: int, opts: InputOptions, root: str | Path = ".") -> JudgeRequest:
    """Turn one raw row into a JudgeRequest; raises RowError naming the row and field."""
    row = apply_column_map(row, opts.column_map)
    rid = row_id_of(row, index)
    root = Path(opts.image_root) if opts.image_root is not None else Path(root)
    schema = detect_schema(row)
    if schema == "llava":
        row = _conversation_row(row, rid)
    if schema == "perception":
        pairwise = row.get("orig_response_A") is not None or row.get("orig_response_B") is not None
        instruction = _text(row, rid, "orig_instruction")
        if pairwise:
            response = _text(row, rid, "orig_response_A")
            response_b = _text(row, rid, "orig_response_B")
        else:
            # published eval rows spell it `original_response`
            use_original = row.get("orig_response") is None and "original_response" in row
            response = _text(row, rid, "original_response" if use_original else "orig_response")
            response_b = None
        reference = _text(row, rid, "orig_reference_answer", required=False)
        rubric = _flat_rubric(row, "orig_", rid, opts)
    else:
        instruction = _text(row, rid, "instruction")
        response = _text(row, rid, "response")
        response_b = _text(row, rid, "response_b", required=False)
        reference = _text(row, rid, "reference_answer", required=False)
        if row.get("rubric") is not None:
            rubric = _rubric(row["rubric"], rid, opts)
        elif row.get("criteria") is not None:
            rubric = _flat_rubric(row, "", rid, opts)
        else:
            rubric = _rubric(None, rid, opts)
    mode = _mode(row, rid, opts, response_b is not None)
    if mode == "absolute" and not rubric.complete:
        raise RowError(rid, "absolute grading needs a rubric with five score descriptions", "rubric")
    images = _images(row, rid, opts, root)
    try:
        return JudgeRequest(
            instruction=instruction or "", response=response or "", rubric=rubric, response_b=response_b,
            reference_answer=reference, images=images, id=rid, mode=mode,  # type: ignore[arg-type]
        )
    except RecordError as e:
        raise RowError(rid, str(e)) from e


def read_requests(path: str | Path, opts: InputOptions | None = None) -> Iterator[tuple[str, JudgeRequest | RowError]]:
    """Yield (row_id, request or RowError) for every row of `path`, in file order.

    A row whose id repeats an earlier row's is an error (ids key the output file and resume);
    it is reported under '<id>#<index>' so that both stay visible.
    """
    opts = opts or InputOptions()
    root = Path(path).parent if Path(path).is_file() else Path(path)
    seen: dict[str, int] = {}
    for index, row in enumerate(iter_raw_rows(path)):
        if isinstance(row, RowError):
            rid = row.row_id
        else:
            rid = row_id_of(apply_column_map(row, opts.column_map), index)
        if rid in seen:
            yield f"{rid}#{index}", RowError(f"{rid}#{index}", f"duplicate id {rid!r} (first at row index {seen[rid]})", "id")
            continue
        seen[rid] = index
        if isinstance(row, RowError):
            yield rid, row
            continue
        try:
            yield rid, row_to_request(row, index, opts, root)
        except RowError as e:
            yield rid, e


def load_rubrics(path: str | Path) -> tuple[Rubric | None, dict[str, Rubric]]:
    """Read a rubric file (JSON/YAML/text): one rubric (the default), or {name: rubric} (a library).

    Returns (default rubric or None, named rubrics). In a library, a rubric named 'default' is the default.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data: Any = yaml.safe_load(text)
    elif p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = text
    try:
        if isinstance(data, str):
            return Rubric.from_text(data), {}
        if isinstance(data, dict) and "criteria" in data:
            return Rubric.from_dict(data), {}
        if isinstance(data, dict):
            lib = {str(k): (Rubric.from_dict(v) if isinstance(v, dict) else Rubric.from_text(str(v))) for k, v in data.items()}
            return lib.get("default"), lib
    except (RecordError, KeyError) as e:
        raise ValueError(f"rubric file {p}: {e}") from e
    raise ValueError(f"rubric file {p}: expected a rubric (criteria + score descriptions) or a mapping name -> rubric")
