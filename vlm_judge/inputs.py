"""The one row reader: files of rows -> JudgeRequests, one row at a time.

Every command reads its input here: `score` (requests), `train` (requests + a target, in
train/data.py) and `eval` (requests + human gold, in eval/benchmarks.py).

Files: JSONL (through `vlm_judge.jsonl.iter_jsonl`), a JSON list, CSV (an empty cell is a missing
value; a cell holding a JSON object or list is read as that JSON), Hugging Face `datasets` files
(parquet, arrow, or a `save_to_disk` folder; an Image column arrives as encoded bytes).

Row shapes are data: `FORMATS` maps each format to the columns that hold each of our fields, tried
in order (ours, Perception / Feedback Collection, VisIT-Bench, LLaVA-Bench, MT-Bench human
judgments, LLaVA conversation rows). The format is detected per row (or fixed by the caller); a
column map ({field: the file's column}, '-' switches a field off) overrides any field.

- ours: `id`?, `instruction`, `response`, `response_b`?, `reference_answer`?, `mode`?,
  `rubric` (a dict {criteria, score1_description..score5_description}, the rubric text form,
  or the name of a rubric in the rubric library), or flat `criteria` + `score1_description`..;
  `images` (a list) or `image` (one): paths, base64 / data URLs, or `datasets` Image dicts.
- Perception Collection / Feedback Collection (published): `orig_instruction`, `orig_response`
  or `original_response` (or `orig_response_A` + `orig_response_B` for pairwise rows),
  `orig_reference_answer`, `orig_criteria`, `orig_score1_description`..5, `image`.
- LLaVA conversation rows (the published Prometheus-Vision training file): `image`,
  `conversations` = [human: a rendered judge prompt, gpt: ...]; the prompt's sections are read back.

Images: one policy everywhere. Relative paths resolve against the image root (default: the input
file's folder) after prefix rewrites; a resolved path must lie inside the allowed folders (default:
the image root and every rewrite target), whether the file wrote it relative or absolute.

A bad line or row never stops the reader: it becomes a `RowError` naming the row, its line and the
field. The row id is the row's `id` when it has one, else its 0-based index among the file's rows
(blank lines are not rows; a bad line is a row, so ids never shift).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_judge.images import ImageError, check_image, load_image, resolve_image
from vlm_judge.jsonl import BadLine, iter_jsonl
from vlm_judge.options import ConfigError, parse_pairs
from vlm_judge.records import ImageRef, JudgeRequest, RecordError, Rubric

_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class RowError(RecordError):
    """A row cannot become a request (or a training example, or a benchmark item).

    `reason` names the field when known (a bad line's reason names its line); `str()` adds the
    row id and line; `kind` is a short category for counts ('missing field', 'unreadable image',
    'bad json', 'invalid row', ...). The reader fills `row_id` and `line`.
    """

    def __init__(self, message: str, *, row_id: str | None = None, field: str | None = None,
                 kind: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.row_id = row_id
        self.field = field
        self.line = line
        self.kind = kind or ("missing field" if message.startswith("missing") else "invalid row")
        super().__init__(message)

    @property
    def reason(self) -> str:
        return f"field '{self.field}': {self.message}" if self.field else self.message

    def __str__(self) -> str:
        s = self.reason if self.row_id is None else f"row {self.row_id}, {self.reason}" if self.field \
            else f"row {self.row_id}: {self.reason}"
        return s if self.line is None or f"line {self.line}" in s else f"{s} (line {self.line})"


# ---- formats: where each of our fields lives, as data -------------------------------------------


@dataclass(frozen=True)
class Format:
    """One row schema: the columns holding each of our fields (tried in order; the first with a
    non-empty value wins), how a row of it is recognised, and what a benchmark of it carries."""

    name: str
    columns: Mapping[str, tuple[str, ...]]
    markers: tuple[frozenset[str], ...] = ()
    """A row is of this format when it has every column of one of these sets."""
    vision: bool = False
    """Items of this benchmark format come with an image (one without is left out)."""
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Fields computed from the row (e.g. read back from a rendered prompt); they win over columns."""


def _rubric_columns(*prefixes: str) -> dict[str, tuple[str, ...]]:
    cols = {"criteria": tuple(p + "criteria" for p in prefixes)}
    cols.update({f"score{i}_description": tuple(f"{p}score{i}_description" for p in prefixes) for i in range(1, 6)})
    return cols


_IDS = ("id", "question_id", "item_id", "idx")
_BENCH = {"id": _IDS, "category": ("category", "instruction_category", "task", "type"),
          "model": ("model", "model_a", "response_model", "generator"), "model_b": ("model_b",),
          **_rubric_columns("orig_", ""), "rubric": ("rubric",), "mode": ("mode",)}
_GOLD = ("gold", "gold_score", "human_score", "score", "preference", "winner", "label")

_OURS = {
    "id": ("id",), "instruction": ("instruction",), "response": ("response", "response_a", "response_A"),
    "response_b": ("response_b", "response_B"), "reference_answer": ("reference_answer", "reference"),
    "rubric": ("rubric",), **_rubric_columns(""), "image": ("images", "image"), "mode": ("mode",),
    "gold": _GOLD, "feedback": ("feedback",), "output": ("output",), "caption": ("caption",),
    "category": ("category",), "model": ("model", "model_a"), "model_b": ("model_b",),
}
_PERCEPTION = {
    "id": ("id",), "instruction": ("orig_instruction",), "response": ("orig_response", "original_response"),
    "response_a": ("orig_response_A", "orig_response_a"), "response_b": ("orig_response_B", "orig_response_b"),
    "reference_answer": ("orig_reference_answer",), **_rubric_columns("orig_"), "image": ("image",),
    "mode": ("mode",), "gold": ("orig_score", "orig_preference", "orig_winner", "gold_score", "human_score", "score",
                                "preference", "winner", "label"),
    "feedback": ("orig_feedback", "feedback"), "output": ("output",), "caption": ("caption",),
    "category": _BENCH["category"], "model": _BENCH["model"], "model_b": ("model_b",),
}


def _mtbench_turns(row: dict[str, Any]) -> dict[str, Any]:
    """MT-Bench human judgments: the judged turn of `conversation_a/_b`; earlier turns become context.
    One row per human vote on a pair, so the id names the pair and the turn."""
    ca, cb = row.get("conversation_a"), row.get("conversation_b")
    if ca is None and cb is None:
        return {}  # the flat question / answer_a / answer_b shape
    if not (isinstance(ca, list) and isinstance(cb, list)):
        raise RowError("conversation_a and conversation_b must both be lists of turns", field="conversation_a")

    def split(conv: list[Any], role: str) -> list[str]:
        return [str(m.get("content", "")) for m in conv if isinstance(m, dict) and m.get("role") == role]

    users, a, b = split(ca, "user"), split(ca, "assistant"), split(cb, "assistant")
    turn = row.get("turn", 1)
    t = max(1, int(turn)) - 1
    if t >= min(len(users), len(a), len(b)):
        raise RowError(f"conversation_a/conversation_b lack turn {turn}", field="conversation_a")
    context = "".join(f"[Earlier turn {k + 1}] User: {users[k]}\n" for k in range(t))
    out: dict[str, Any] = {"instruction": context + users[t], "response": a[t], "response_b": b[t]}
    qid = row.get("question_id", row.get("id"))
    if qid is not None:
        out["id"] = f"{qid}-{row.get('model_a')}-{row.get('model_b')}-t{turn}"
    return out


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
        name = next((n for n, h in _SECTIONS.items() if m.group(0).startswith(h)), None)
        if name and name != "feedback":
            out[name] = body
    return out


def _conversation(row: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA conversation row: our fields from the sections of its human turn; `output` is the gpt turn."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise RowError("must be a list of turns", field="conversations")

    def turn(*who: str) -> str:
        return next((str(t.get("value", "")) for t in turns if isinstance(t, dict) and t.get("from") in who), "")

    parts = split_prompt(turn("human", "user"))
    if not parts.get("instruction"):
        raise RowError("the human turn has no '###The instruction to evaluate:' section", field="conversations",
                       kind="missing field")
    out: dict[str, Any] = {k: v for k, v in parts.items() if k not in ("response_a", "rubric")}
    if "response_a" in parts:
        out["response"] = parts["response_a"]
    if parts.get("rubric"):
        text = parts["rubric"]
        out["rubric"] = text if "Score 1" in text else {"criteria": text.strip().removeprefix("[").removesuffix("]")}
    out["output"] = turn("gpt", "assistant")
    return out


FORMATS: dict[str, Format] = {
    "ours": Format("ours", _OURS),
    "conversation": Format("conversation", {"id": ("id",), "image": ("images", "image"), "mode": ("mode",)},
                           markers=(frozenset({"conversations"}),), convert=_conversation),
    "perception": Format("perception", _PERCEPTION, vision=True,
                         markers=(frozenset({"orig_instruction", "image"}), frozenset({"orig_criteria", "image"}))),
    "feedback": Format("feedback", {**_PERCEPTION, "image": ()},
                       markers=(frozenset({"orig_instruction"}), frozenset({"orig_criteria"}))),
    "visit": Format("visit", vision=True, markers=(frozenset({"instruction_conditioned_caption"}),), columns={
        **_BENCH, "instruction": ("instruction",), "image": ("image", "image_path", "image_file", "image_url"),
        "caption": ("instruction_conditioned_caption", "caption"),
        "reference_answer": ("reference_output", "reference", "reference_answer"),
        "response": ("response", "output", "response_a", "A"), "response_b": ("response_b", "B"),
        "gold": ("human_ratings", "human_rating", "human_score", "rating", "human_preference", "preference", "winner",
                 "human_ratings_gpt4_correct")}),
    "llava": Format("llava", vision=True, markers=(frozenset({"question", "image"}),), columns={
        **_BENCH, "instruction": ("question", "text", "instruction"), "image": ("image", "image_path"),
        "caption": ("caption", "context"), "reference_answer": ("gpt4_answer", "reference", "reference_answer"),
        "response": ("answer", "response", "output"), "gold": ("gold_score", "score", "human_score", "rating")}),
    "mtbench": Format("mtbench", convert=_mtbench_turns,
                      markers=(frozenset({"conversation_a"}), frozenset({"winner", "model_a"})), columns={
        **_BENCH, "instruction": ("question", "instruction"), "reference_answer": ("reference",),
        "response": ("answer_a", "response_a", "response"), "response_b": ("answer_b", "response_b"),
        "gold": ("winner", "preference")}),
    "jsonl": Format("jsonl", {  # generic benchmark rows: ours, with the spellings benchmark files use
        **_BENCH, "instruction": ("instruction", "question", "prompt"), "image": ("images", "image", "image_path"),
        "caption": ("caption",), "reference_answer": ("reference_answer", "reference"),
        "response": ("response", "answer", "output", "response_a"), "response_b": ("response_b", "answer_b"),
        "gold": _GOLD}),
}
SCORE_FORMATS = ("conversation", "perception", "feedback")
"""Formats `score` and `train` recognise per row (others are `ours`)."""
FIELD_SPELLINGS = {"reference": "reference_answer", "images": "image",
                   **{f"score{i}": f"score{i}_description" for i in range(1, 6)}}
"""Other names a column map may use for a field."""
FIELD_NAMES = frozenset(f for fmt in FORMATS.values() for f in fmt.columns)


def detect_format(row: dict[str, Any], among: tuple[str, ...] = SCORE_FORMATS, fallback: str = "ours") -> str:
    """The first format of `among` whose markers the row has, else `fallback`."""
    keys = set(row)
    return next((n for n in among if any(m <= keys for m in FORMATS[n].markers)), fallback)


def parse_column_map(spec: str | list[str] | Mapping[str, str] | None, flag: str = "--column-map") -> dict[str, str]:
    """'gold=my_rating,image=img', a list of such items, or a dict -> {our field: the file's column}."""
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    return parse_pairs(spec, flag, split_commas=True)


def _columns(fmt: Format, column_map: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    cols = dict(fmt.columns)
    known = sorted({*FIELD_NAMES, *FIELD_SPELLINGS})
    for name, col in column_map.items():
        name = FIELD_SPELLINGS.get(name, name)
        if name not in FIELD_NAMES:
            raise ConfigError(f"column map: unknown field {name!r}; fields are {known}")
        cols[name] = () if col in ("", "-") else (col,)  # '-' switches a field off
    return cols


# ---- how rows become requests --------------------------------------------------------------------


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
    """{our field: the file's column}; '-' switches a field off."""
    mode: str = "auto"
    """'auto' (relative when the row has a second response), 'absolute' or 'relative'."""
    default_rubric: Rubric | None = None
    """Used for rows that carry no rubric."""
    rubrics: dict[str, Rubric] = field(default_factory=dict)
    """Named rubrics a row may refer to by name in its `rubric` field."""
    fill_rubric: Rubric | None = None
    """An absolute row whose rubric has no score descriptions takes this rubric's."""
    check_images: bool | str = True
    """'verify' (True): check each image's header (size, aspect ratio) and file integrity when its row
    is read, decoding no pixels, so a run over huge images holds none (an image that still fails
    to decode fails its own row in the backend); 'decode': decode it fully; False: no check."""
    max_pixels: int = 50_000_000
    """Images with more pixels are refused (decompression bombs)."""
    format: str = "auto"
    """A name in FORMATS, or 'auto' to detect each row's format among SCORE_FORMATS."""
    duplicate_ids: str = "error"
    """A repeated id: 'error' (ids key outputs and resume), 'number' (id#2, id#3...) or 'keep'."""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "absolute", "relative"):
            raise ValueError(f"mode must be auto, absolute or relative, got {self.mode!r}")
        self.check_images = {True: "verify", False: "none"}.get(self.check_images, self.check_images)  # type: ignore[call-overload]
        if self.check_images not in ("decode", "verify", "none"):
            raise ValueError(f"check_images must be decode, verify or none, got {self.check_images!r}")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {sorted(FORMATS)}")
        if self.duplicate_ids not in ("error", "number", "keep"):
            raise ValueError(f"duplicate_ids must be error, number or keep, got {self.duplicate_ids!r}")
        self.column_map = parse_column_map(self.column_map)
        for fmt in FORMATS.values():
            _columns(fmt, self.column_map)  # an unknown field fails now, not on every row

    def root_for(self, path: str | Path) -> Path:
        """Where relative image paths of `path`'s rows resolve: the image root, else the file's folder."""
        if self.image_root is not None:
            return Path(self.image_root)
        return Path(path) if Path(path).is_dir() else Path(path).parent

    def allowed_folders(self, root: Path) -> list[Path]:
        if self.allowed is not None:
            return [Path(a).resolve() for a in self.allowed]
        out = [root.resolve()]
        for new in self.image_rewrites.values():
            # a rewrite target is where the user told us the images are: allow it
            out.append(Path(new).resolve() if Path(new).is_absolute() else (root / new).resolve())
        return out


@dataclass
class Row:
    """One row of a file, before it becomes a request: its position, its values and its format."""

    index: int
    """0-based position among the file's rows (blank lines are not rows, bad lines are)."""
    line: int
    """1-based line of a JSONL/CSV file (for other files, index + 1)."""
    data: dict[str, Any]
    format: Format = FORMATS["ours"]
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    """Fields the format computed from the row; they win over columns."""
    id: str = ""
    error: RowError | None = None

    def pick(self, name: str) -> tuple[str, Any]:
        """(the column that held field `name`, its value), or (the first column it may be in, None)."""
        if name in self.values:
            return name, None if _blank(self.values[name]) else self.values[name]
        cols = self.columns.get(name, ())
        for col in cols:
            if not _blank(self.data.get(col)):
                return col, self.data[col]
        return (cols[0] if cols else name), None

    def get(self, name: str) -> Any:
        return self.pick(name)[1]

    @property
    def has_id(self) -> bool:
        return self.get("id") is not None


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, (list, tuple)) and not v)


def prepare_row(data: dict[str, Any], index: int, opts: InputOptions, line: int | None = None) -> Row:
    """A raw row -> Row: format detected (or fixed), column map applied, computed fields filled.
    A row whose format cannot read it gets `error` set (nothing raises)."""
    fmt = FORMATS[opts.format if opts.format != "auto" else detect_format(data)]
    row = Row(index, line if line is not None else index + 1, data, fmt, _columns(fmt, opts.column_map))
    try:
        row.values = fmt.convert(data) if fmt.convert else {}
    except RowError as e:
        row.error = e
    except (TypeError, ValueError, AttributeError) as e:
        row.error = RowError(f"cannot read a {fmt.name} row: {e}")
    rid = row.get("id")
    row.id = str(index) if rid is None else str(rid)
    return row


def row_id_of(row: dict[str, Any], index: int) -> str:
    """The row's `id` when present and non-empty, else its index."""
    rid = row.get("id")
    return str(index) if rid is None or str(rid) == "" else str(rid)


# ---- files -> rows -----------------------------------------------------------------------------


def iter_rows(path: str | Path, opts: InputOptions | None = None) -> Iterator[Row]:
    """Every row of `path` in file order; a bad line or an unreadable row is a Row with `error` set."""
    opts = opts or InputOptions()
    seen: dict[str, list[int]] = {}  # id -> [first row index, rows with it]
    for index, (line, data) in enumerate(_iter_file(Path(path))):
        if isinstance(data, RowError):
            row = Row(index, line, {}, id=str(index), error=data)
        else:
            row = prepare_row(data, index, opts, line)
        first = seen.setdefault(row.id, [index, 0])
        first[1] += 1
        if first[1] > 1 and opts.duplicate_ids == "error":
            row.error = RowError(f"duplicate id {row.id!r} (first at row index {first[0]})", field="id",
                                 kind="duplicate id")
            row.id = f"{row.id}#{index}"
        elif first[1] > 1 and opts.duplicate_ids == "number":
            row.id = f"{row.id}#{first[1]}"
        if row.error is not None:
            row.error.row_id, row.error.line = row.id, line
        yield row


def _iter_file(p: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """(line number, raw row or RowError) for each row of a file or `datasets` folder."""
    if p.is_dir():
        for k, r in enumerate(_iter_dataset(_load_datasets_dir(p))):
            yield k + 1, r
        return
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for lineno, obj in iter_jsonl(p):
            yield lineno, RowError(f"bad JSON on line {lineno}: {obj.reason}", kind="bad json") \
                if isinstance(obj, BadLine) else obj
    elif suffix == ".json":
        for k, item in enumerate(_json_rows(p)):
            yield k + 1, item if isinstance(item, dict) else RowError(
                f"item {k + 1} of the list is not a JSON object (a {type(item).__name__})", kind="bad json")
    elif suffix == ".csv":
        yield from _csv_rows(p)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        k = 0
        for batch in pq.ParquetFile(p).iter_batches(batch_size=256):
            for r in batch.to_pylist():
                k += 1
                yield k, r
    elif suffix == ".arrow":
        from datasets import Dataset

        for k, r in enumerate(_iter_dataset(Dataset.from_file(str(p)))):
            yield k + 1, r
    else:
        raise ValueError(f"{p}: unsupported input type {suffix!r} (use {', '.join(INPUT_SUFFIXES)} or a datasets folder)")


INPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def count_rows(path: str | Path) -> int | None:
    """How many rows `path` holds, read cheaply (for progress totals): non-blank lines of a JSONL
    file, records of a CSV, a parquet file's metadata, a datasets folder's length; None where only
    a full parse would tell (.json). Raises like the reader for a missing file or unsupported type,
    so a command can check its input before loading a model."""
    p = Path(path)
    if p.is_dir():
        return len(_load_datasets_dir(p))
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise ValueError(f"{p}: unsupported input type {suffix!r} (use {', '.join(INPUT_SUFFIXES)} or a datasets folder)")
    if suffix == ".jsonl":
        with p.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if suffix == ".csv":
        return sum(1 for _ in _csv_rows(p))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows
    return None


def _json_rows(p: Path) -> list[Any]:
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{p}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = data.get("data") if isinstance(data.get("data"), list) else data.get("rows") \
            if isinstance(data.get("rows"), list) else lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise ValueError(f"{p}: a .json input must hold a list of row objects (or {{'data': [...]}})")
    return data


def _csv_rows(p: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    # surrogateescape keeps a bad byte visible in its own row instead of failing the whole file
    reader = csv.DictReader(io.StringIO(p.read_bytes().decode("utf-8", errors="surrogateescape"), newline=""))
    while True:
        start = reader.line_num + 1 if reader.line_num else 2
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, RowError(f"bad CSV on line {start}: {e}", kind="bad json")
            continue
        if any(isinstance(v, str) and re.search("[\udc80-\udcff]", v) for v in rec.values()):
            yield start, RowError(f"bad JSON on line {start}: not valid UTF-8", kind="bad json")
            continue
        yield start, {k: _cell(v) for k, v in rec.items() if k is not None and v not in (None, "")}


def _cell(v: str) -> Any:
    """A CSV cell: JSON when it holds an object or a list (a rubric, a list of images), else text."""
    if v[:1] in "{[" and v[-1:] in "}]":
        try:
            return json.loads(v)
        except (ValueError, RecursionError):
            return v
    return v


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


# ---- one row -> JudgeRequest ---------------------------------------------------------------------


def _text(row: Row, name: str, required: bool = True) -> str | None:
    col, v = row.pick(name)
    if v is None:
        if required:
            raise RowError("missing or empty", field=col)
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise RowError(f"must be text, got {type(v).__name__}", field=col)
    return str(v)


def _rubric(value: Any, name: str, opts: InputOptions) -> Rubric:
    """A rubric from a row's value: a Rubric, a dict, the text form or a library name."""
    try:
        if isinstance(value, Rubric):
            return value
        if isinstance(value, dict):
            if "criteria" not in value:
                raise RowError("a rubric object needs 'criteria'", field=name)
            keys = [f"score{i}_description" for i in range(1, 6)]
            missing = [k for k in keys if not str(value.get(k) or "").strip()]
            if "score_descriptions" not in value and 0 < len(missing) < 5:
                raise RowError(f"rubric lacks {', '.join(missing)} (it needs all of score1..score5)", field=name)
            return Rubric.from_dict(value)
        if isinstance(value, str):
            if value in opts.rubrics:
                return opts.rubrics[value]
            if "Score 1" not in value and len(value.split()) <= 3:
                raise RowError(f"unknown rubric name {value!r} (known: {sorted(opts.rubrics) or 'none'})", field=name)
            return Rubric.from_text(value)
        raise RowError(f"must be an object, text or a rubric name, got {type(value).__name__}", field=name)
    except RowError:
        raise
    except (RecordError, KeyError, TypeError) as e:
        raise RowError(str(e), field=name) from e


def _row_rubric(row: Row, opts: InputOptions) -> Rubric:
    col, value = row.pick("rubric")
    if value is not None:
        return _rubric(value, col, opts)
    ccol, criteria = row.pick("criteria")
    if criteria is None:
        if opts.default_rubric is None:
            raise RowError("missing (and no default rubric was given)", field=col if row.columns.get("rubric") else ccol)
        return opts.default_rubric
    descs = [row.pick(f"score{i}_description") for i in range(1, 6)]
    present = [v for _, v in descs if v is not None]
    if present and len(present) != 5:
        raise RowError("missing or empty (a rubric needs all five score descriptions)",
                       field=next(c for c, v in descs if v is None))
    text = str(criteria).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return Rubric(text, tuple(str(d) for d in present))
    except RecordError as e:
        raise RowError(str(e), field=ccol) from e


def _decode_base64_image(s: str, force: bool = False) -> bytes | None:
    """Bytes of a base64 / data-URL image string, or None when `s` is not one (a path, then)."""
    if s.startswith("data:"):
        head, _, payload = s.partition(",")
        if ";base64" not in head:
            return None
        s = payload
    elif not force and (len(s) < 64 or "/" in s[:64] and "." in s[-6:]):
        return None  # short strings and path-like strings are paths
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(_IMAGE_MAGIC) else None


def _image_ref(v: Any, root: Path, opts: InputOptions) -> ImageRef:
    if isinstance(v, str):
        data = _decode_base64_image(v)
        if data is not None:
            return ImageRef(data=data)
    if isinstance(v, dict) and isinstance(v.get("bytes"), str):
        data = _decode_base64_image(v["bytes"], force=True)
        if data is None:
            raise ImageError("an image's 'bytes' must be encoded image bytes (or base64 of them), got text")
        return ImageRef(data=data)
    return resolve_image(v, root, opts.image_rewrites, opts.allowed_folders(root))


def _images(row: Row, opts: InputOptions, root: Path) -> tuple[ImageRef, ...]:
    name, value = row.pick("image")
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    refs = []
    for k, v in enumerate(values):
        where = name if len(values) == 1 else f"{name}[{k}]"
        try:
            ref = _image_ref(v, root, opts)
            if opts.check_images == "decode":
                load_image(ref, max_pixels=opts.max_pixels)
            elif opts.check_images == "verify":
                check_image(ref, max_pixels=opts.max_pixels)  # header and chunks only: no pixels held
        except (ImageError, RecordError) as e:
            hint = ""
            if "outside the allowed folders" in str(e):
                hint = " (point it at your images with --image-rewrite OLD=NEW or --image-root)"
            raise RowError(f"{e}{hint}", field=where, kind="unreadable image") from e
        refs.append(ref)
    return tuple(refs)


def _mode(row: Row, opts: InputOptions, has_b: bool) -> str:
    mode = opts.mode
    col, row_mode = row.pick("mode")
    if row_mode is not None:
        if row_mode not in ("absolute", "relative"):
            raise RowError(f"must be 'absolute' or 'relative', got {row_mode!r}", field=col)
        if mode != "auto" and row_mode != mode:
            raise RowError(f"row says {row_mode!r} but the run is --mode {mode}", field=col)
        mode = row_mode
    if mode == "auto":
        return "relative" if has_b else "absolute"
    if mode == "relative" and not has_b:
        raise RowError("missing or empty (relative grading needs a second response)", field=row.pick("response_b")[0])
    if mode == "absolute" and has_b:
        raise RowError("absolute grading takes one response; drop response_b or use --mode relative",
                       field=row.pick("response_b")[0])
    return mode


def is_pairwise(row: Row) -> bool:
    """The row holds two responses (or names its first one as response A)."""
    return row.get("response_b") is not None or row.get("response_a") is not None


def to_request(row: Row, opts: InputOptions, root: str | Path = ".") -> JudgeRequest:
    """Turn one Row into a JudgeRequest; raises RowError naming the row, its line and the field."""
    try:
        if row.error is not None:
            raise row.error
        return _to_request(row, opts, Path(opts.image_root) if opts.image_root is not None else Path(root))
    except RowError as e:
        e.row_id, e.line = row.id, row.line
        raise
    except (RecordError, TypeError, ValueError, AttributeError) as e:  # a value of an unexpected shape
        raise RowError(f"cannot read the row: {e}", row_id=row.id, line=row.line) from e


def _to_request(row: Row, opts: InputOptions, root: Path) -> JudgeRequest:
    instruction = _text(row, "instruction")
    pairwise = is_pairwise(row)
    response_b = _text(row, "response_b", required=row.get("response_a") is not None)
    response = _text(row, "response_a" if pairwise and row.columns.get("response_a") else "response")
    reference = _text(row, "reference_answer", required=False)
    rubric = _row_rubric(row, opts)
    mode = _mode(row, opts, response_b is not None)
    if mode == "absolute" and not rubric.complete:
        if opts.fill_rubric is not None and opts.fill_rubric.complete:
            rubric = Rubric(rubric.criteria, opts.fill_rubric.score_descriptions)
        else:
            raise RowError("absolute grading needs a rubric with five score descriptions", field="rubric")
    images = _images(row, opts, root)
    return JudgeRequest(
        instruction=instruction or "", response=response or "", rubric=rubric, response_b=response_b,
        reference_answer=reference, images=images, id=row.id, mode=mode,  # type: ignore[arg-type]
    )


def row_to_request(row: dict[str, Any], index: int, opts: InputOptions, root: str | Path = ".") -> JudgeRequest:
    """Turn one raw row into a JudgeRequest; raises RowError naming the row and field."""
    return to_request(prepare_row(row, index, opts), opts, root)


def read_requests(path: str | Path, opts: InputOptions | None = None) -> Iterator[tuple[str, JudgeRequest | RowError]]:
    """Yield (row_id, request or RowError) for every row of `path`, in file order.

    A row whose id repeats an earlier row's is an error (ids key the output file and resume);
    it is reported under '<id>#<index>' so that both stay visible.
    """
    opts = opts or InputOptions()
    root = opts.root_for(path)
    for row in iter_rows(path, opts):
        try:
            yield row.id, to_request(row, opts, root)
        except RowError as e:
            yield row.id, e


# ---- rubric files --------------------------------------------------------------------------------


def load_rubrics(path: str | Path) -> tuple[Rubric | None, dict[str, Rubric]]:
    """Read a rubric file (JSON/YAML/text): one rubric (the default), or {name: rubric} (a library).

    The one loader of `score --rubric` and `eval --rubric`. Returns (default rubric or None, named
    rubrics). In a library, a rubric named 'default' is the default.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"rubric file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data: Any = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = text
        if isinstance(data, str):
            return Rubric.from_text(data), {}
        if isinstance(data, dict) and "criteria" in data:
            return Rubric.from_dict(data), {}
        if isinstance(data, dict):
            lib = {str(k): (Rubric.from_dict(v) if isinstance(v, dict) else Rubric.from_text(str(v)))
                   for k, v in data.items()}
            return lib.get("default"), lib
    except (RecordError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"rubric file {p}: {e}") from e
    except Exception as e:  # yaml.YAMLError, without importing yaml for files that are not YAML
        raise ValueError(f"rubric file {p}: {type(e).__name__}: {e}") from e
    raise ValueError(f"rubric file {p}: expected a rubric (criteria + score descriptions) or a mapping name -> rubric")
