"""The data builder's configuration: one dataclass tree; a YAML recipe is a saved instance.

`BuildConfig.from_yaml(path)` reads a recipe, `with_overrides(["teacher.model=x", ...])` applies
dotted KEY=VALUE flags on top (the one override parser, `vlm_judge.options.parse_overrides`), and
every bad value or bad combination fails in `__post_init__` with a `ConfigError` that names the
fields, before any image is read or any teacher call is made.

Relative paths written in a recipe (source and seed files, an hf teacher's model folder) are relative
to the recipe file, as in training recipes; paths given as overrides on the command line are relative
to the working directory. `out` (the run folder) is an output path: relative to the working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from perception_collection.export import FORMATS as EXPORT_FORMATS
from vlm_judge.options import ConfigError, parse_overrides, parse_pairs, recipe_path, set_dotted, yaml_value

SOURCE_KINDS = ("coco", "mmmu", "folder", "easyvqa")
TEACHER_KINDS = ("openai", "hf", "answer_grounded")


# source and seed fields that hold paths (resolved against the recipe's folder by `from_yaml`)
_PATH_FIELDS = {"source": ("path", "images", "captions", "instances", "metadata"), "seeds": ("path",)}


@dataclass
class SourceConfig:
    """Where the images come from."""

    kind: str = "folder"
    """'coco', 'mmmu', 'folder' or 'easyvqa'."""
    path: str | None = None
    """mmmu: a parquet file, a folder of parquet files or a `datasets.save_to_disk` folder;
    folder: the image folder; coco: the image folder (same as `images`); easyvqa: its data root."""
    images: str | None = None
    """coco: the folder holding the images named in the annotation files (e.g. val2017/)."""
    captions: str | None = None
    """coco: captions_*.json."""
    instances: str | None = None
    """coco: instances_*.json (object labels)."""
    metadata: str | None = None
    """folder: optional metadata.jsonl / metadata.csv with a `file_name` column."""
    split: str = "train"
    """easyvqa split ('train' or 'test'); ignored by the others."""
    limit: int | None = None
    """Keep at most this many valid images (None: all)."""
    max_pixels: int = 50_000_000
    """Refuse images with more pixels than this (checked from the header, before decoding)."""
    min_side: int = 32
    """Refuse images whose shorter side is smaller than this (icons, spacer pixels)."""
    max_side: int | None = None
    """Send the teacher a copy scaled down to this longer side (fewer image tokens, smaller requests);
    None: the original. The exported rows reference what the teacher saw."""
    skip_multi_image: bool = True
    """mmmu: drop questions with more than one image (a SourceImage shows one image to the teacher)."""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"source.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.kind == "coco":
            if not (self.images or self.path):
                raise ConfigError("source.kind 'coco' needs source.images (the image folder)")
            if not (self.captions or self.instances):
                raise ConfigError("source.kind 'coco' needs source.captions and/or source.instances (annotation JSON)")
        if self.kind in ("mmmu", "folder") and not self.path:
            raise ConfigError(f"source.kind {self.kind!r} needs source.path")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"source.limit must be a positive integer or null, got {self.limit!r}")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ConfigError("source.max_pixels and source.min_side must be >= 1")
        if self.max_side is not None and self.max_side < self.min_side:
            raise ConfigError(f"source.max_side ({self.max_side}) must be null or >= source.min_side ({self.min_side})")


@dataclass
class SeedsConfig:
    """Which seed rubrics the teacher sees in context for each image."""

    path: str | None = None
    """A seed rubric YAML file; None: the file shipped with the package."""
    categories: list[str] | None = None
    """Only seeds of these categories (None: all)."""
    per_image: int = 4
    """Seeds shown to the teacher per image (sampled per image, reproducibly from `seed`)."""

    def __post_init__(self) -> None:
        if self.per_image < 1:
            raise ConfigError(f"seeds.per_image must be >= 1, got {self.per_image}")
        if self.categories is not None and (isinstance(self.categories, str) or not self.categories):
            raise ConfigError("seeds.categories must be a non-empty list of names or null")


@dataclass
class CountsConfig:
    """How much the tree fans out: images -> rubrics -> instructions -> 5 responses."""

    rubrics_per_image: int = 2
    instructions_per_rubric: int = 2
    paraphrase_rubrics: bool = True
    """Reword each brainstormed rubric in a second teacher call (more varied wording across the data)."""
    rubric_dedup_threshold: float = 0.8
    """Rubrics of one image whose criteria are at least this similar to a kept one are dropped."""

    def __post_init__(self) -> None:
        if self.rubrics_per_image < 1 or self.instructions_per_rubric < 1:
            raise ConfigError("counts.rubrics_per_image and counts.instructions_per_rubric must be >= 1")
        if not 0.0 < self.rubric_dedup_threshold <= 1.0:
            raise ConfigError(f"counts.rubric_dedup_threshold must be in (0, 1], got {self.rubric_dedup_threshold}")


@dataclass
class TeacherConfig:
    """The model that writes the text of every stage."""

    kind: str = "openai"
    """'openai' (any OpenAI-compatible server with image input), 'hf' (local transformers model)
    or 'answer_grounded' (no model: responses written from easy-vqa's gold answers)."""
    model: str | None = None
    """The served model name (openai) or a model path (hf)."""
    base_url: str | None = None
    """openai: e.g. http://localhost:8000/v1."""
    base_urls: list[str] | None = None
    """openai: several replicas; requests are balanced over them."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in a recipe)."""
    concurrency: int = 8
    """Teacher calls in flight at once."""
    temperature: float = 0.7
    max_tokens: int = 2048
    timeout: float = 300.0
    """Seconds per HTTP request (openai)."""
    max_retries: int = 4
    """HTTP retries with backoff on 429/5xx/connection errors (openai)."""
    parse_retries: int = 1
    """Extra calls (with another sampling seed) when the output cannot be parsed."""
    backend_args: dict[str, Any] = field(default_factory=dict)
    """Extra options for the backend (e.g. hf: device, dtype): a mapping, or KEY=VALUE text as
    `--backend-arg` takes it (`teacher.backend_args=device=cuda:0,dtype=bfloat16`)."""

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ConfigError(f"teacher.kind must be one of {TEACHER_KINDS}, got {self.kind!r}")
        if self.kind in ("openai", "hf") and not self.model:
            raise ConfigError(f"teacher.kind {self.kind!r} needs teacher.model")
        if self.kind == "openai" and not (self.base_url or self.base_urls):
            raise ConfigError("teacher.kind 'openai' needs teacher.base_url (or teacher.base_urls)")
        if self.concurrency < 1 or self.max_tokens < 1 or self.max_retries < 0 or self.parse_retries < 0:
            raise ConfigError("teacher.concurrency and teacher.max_tokens must be >= 1, "
                              "teacher.max_retries and teacher.parse_retries >= 0")
        if self.temperature < 0 or self.timeout <= 0:
            raise ConfigError("teacher.temperature must be >= 0 and teacher.timeout > 0")
        if isinstance(self.backend_args, (str, list)):
            self.backend_args = parse_pairs(self.backend_args, "teacher.backend_args", split_commas=True,
                                            json_values=True)
        if not isinstance(self.backend_args, dict):
            raise ConfigError("teacher.backend_args must be a mapping (or KEY=VALUE,...)")


def _filter_config(value: Any) -> Any:
    """A filters.FilterConfig from a mapping (imported here so a recipe is checked up front)."""
    from perception_collection.filters import FilterConfig

    if isinstance(value, FilterConfig):
        return value
    if value is None:
        return FilterConfig()
    if not isinstance(value, dict):
        raise ConfigError("filters must be a mapping of FilterConfig fields")
    return _build(FilterConfig, value, "filters")


@dataclass
class BuildConfig:
    """Everything `vlm-judge data build` needs. Saved, resolved, into every run folder."""

    source: SourceConfig = field(default_factory=SourceConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    counts: CountsConfig = field(default_factory=CountsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    length_ratio: float = 2.0
    """Largest allowed max/min word count among the five responses of one instruction."""
    max_regenerations: int = 2
    """Extra tries for a response group over `length_ratio` before it is dropped."""
    filters: Any = None
    """A filters.FilterConfig (a mapping in YAML); None: its defaults."""
    noisy: bool = False
    """Also build noisy-instruction pairs (Self-Taught-Evaluator style) for each instruction."""
    export: list[str] = field(default_factory=lambda: ["jsonl", "feedback_collection"])
    """Formats to write: jsonl (Perception Collection rows), parquet, feedback_collection, pairwise."""
    out: str = "runs/perception"
    """Run folder; a re-run with the same folder resumes."""
    seed: int = 0
    """Seeds the per-image seed-rubric sample and the teacher's sampling."""

    def __post_init__(self) -> None:
        for name, cls in (("source", SourceConfig), ("seeds", SeedsConfig), ("counts", CountsConfig),
                          ("teacher", TeacherConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, _build(cls, v, name))
            elif not isinstance(v, cls):
                raise ConfigError(f"{name} must be a mapping")
        self.filters = _filter_config(self.filters)
        if not isinstance(self.length_ratio, (int, float)) or self.length_ratio < 1.0:
            raise ConfigError(f"length_ratio must be a number >= 1 (max/min word count), got {self.length_ratio!r}")
        if self.max_regenerations < 0:
            raise ConfigError("max_regenerations must be >= 0")
        if isinstance(self.export, str):
            self.export = [self.export]
        bad = [f for f in self.export if f not in EXPORT_FORMATS]
        if bad or not self.export:
            raise ConfigError(f"export must list formats from {EXPORT_FORMATS}, got {self.export!r}")
        if not self.out:
            raise ConfigError("out (the run folder) must be set")
        if self.teacher.kind == "answer_grounded" and self.source.kind != "easyvqa":
            raise ConfigError("teacher.kind 'answer_grounded' writes from gold VQA answers: it needs "
                              f"source.kind 'easyvqa', got source.kind {self.source.kind!r}")

    # ---- reading and writing -----------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        """Build from a mapping (a parsed recipe); unknown keys are errors, not silently ignored."""
        if not isinstance(d, dict):
            raise ConfigError("a recipe must be a mapping of fields")
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> BuildConfig:
        """Read a recipe file."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"recipe {p}: expected a mapping of fields, got {type(d).__name__}")
        return cls.from_dict(_resolve_paths(d, p.resolve().parent))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (the resolved recipe)."""
        d = dataclasses.asdict(self)
        d["filters"] = dataclasses.asdict(self.filters) if dataclasses.is_dataclass(self.filters) else self.filters
        return d

    def to_yaml(self) -> str:
        """The recipe as YAML (what `from_yaml` reads back)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> BuildConfig:
        """A copy with dotted KEY=VALUE overrides applied (values parsed as YAML: 3, true, [a, b])."""
        d = self.to_dict()
        if isinstance(overrides, dict):
            items = overrides.items()
        else:
            items = ((k, yaml_value(v)) for k, v in parse_overrides(overrides)[0].items())
        for key, value in items:
            set_dotted(d, key, value)
        return BuildConfig.from_dict(d)


def _resolve_paths(d: dict[str, Any], recipe_dir: Path) -> dict[str, Any]:
    """A parsed recipe with its relative paths made relative to the recipe's folder."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for section, names in _PATH_FIELDS.items():
        sec = d.get(section)
        for name in names if isinstance(sec, dict) else ():
            if isinstance(sec.get(name), str) and sec[name]:
                sec[name] = recipe_path(sec[name], recipe_dir)
    teacher = d.get("teacher")
    if isinstance(teacher, dict) and teacher.get("kind") == "hf" and isinstance(teacher.get("model"), str):
        teacher["model"] = recipe_path(teacher["model"], recipe_dir, model_name=True)
    return d


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(f"unknown field(s) {[prefix + u for u in unknown]}; known: {sorted(known)}")
    try:
        return cls(**d)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. a list where a number belongs; FilterConfig's own checks
        raise ConfigError(f"{where or 'recipe'}: {e}") from e
