"""TrainConfig: one dataclass for a training run. A YAML recipe is a saved instance of it.

`vlm-judge train RECIPE.yaml --lr 1e-4 --lora.r 8`: the recipe is read, flags override fields
(parsed by the one override parser, `vlm_judge.options.parse_overrides`; dotted names are flattened
to underscores, so `--lora_r` and `--lora.r` are the same), and `__post_init__` rejects bad
combinations with a message that names the fields involved.

Relative paths written in a recipe are relative to the recipe file (`vlm_judge.options.recipe_path`,
the rule data-build recipes follow too); paths given as flags are relative to the working directory,
and `output_dir` (an output path) always is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm_judge.options import ConfigError, recipe_path

KINDS = ("vision", "text")
FINETUNES = ("lora", "full")
MODES = ("absolute", "relative", "mixed")


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths are resolved relative to the recipe file."""

    # ---- model ----------------------------------------------------------------------------
    base_model: str = ""
    """A transformers model folder or hub name (LLaVA family for kind=vision, a chat causal LM for text);
    'tiny:llava' / 'tiny:text' build a tiny random model offline (debug recipe, tests, benchmarks)."""
    kind: Literal["vision", "text"] = "vision"
    """'vision': AutoModelForImageTextToText + processor; 'text': AutoModelForCausalLM + tokenizer."""
    template: str = "default"
    """Prompt template name (vlm_judge.prompts) or template file; written into the judge card."""
    chat_template: str | None = None
    """Override the tokenizer's chat template (Jinja text or a path to a .jinja file)."""

    # ---- fine-tuning ----------------------------------------------------------------------
    finetune: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target: str | None = None
    """Regex over module names; None: every linear layer of the language model except lm_head."""
    train_projector: bool = False
    """Vision judges: also train the multimodal projector (LoRA: as modules_to_save)."""
    freeze_vision_tower: bool = True
    """Full fine-tuning: keep the vision tower frozen (LoRA never touches it)."""
    merge_adapter_on_save: bool = False
    """LoRA: save merged full weights instead of the adapter."""
    freeze_embeddings: bool = False
    """Full fine-tuning: keep the token embeddings and the LM head frozen. With a pretrained LM the
    judge writes words it already knows, and a large vocabulary's table is most of a small model's
    parameters (SmolLM2-135M: 28M of them), so training it costs time and memory for little gain."""

    # ---- data -----------------------------------------------------------------------------
    train_data: list[str] = field(default_factory=list)
    """JSON/JSONL/parquet files: Perception/Feedback Collection rows, LLaVA conversation rows or pairwise rows."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out files; if empty, `eval_fraction` of the training rows is held out."""
    eval_fraction: float = 0.0
    mode: Literal["absolute", "relative", "mixed"] = "mixed"
    """Which rows to keep: absolute (1..5), relative (A/B) or both."""
    image_root: str | None = None
    """Folder that relative image paths are resolved against (default: each data file's folder)."""
    image_rewrites: dict[str, str] = field(default_factory=dict)
    """Path prefix rewrites, e.g. {'../train2017/': '/data/coco/train2017/'}."""
    allowed_image_dirs: list[str] | None = None
    """Folders images may be read from (default: anywhere under image_root or the data folder)."""
    max_length: int = 2048
    """Rows whose prompt + target exceed this many tokens are skipped (or fail, see on_bad_row)."""
    on_bad_row: Literal["skip", "fail"] = "skip"
    swap_augment: bool = True
    """Relative rows: also train on the pair in the swapped order (verdict and feedback swapped)."""
    reference_dropout: float = 0.0
    """Probability of dropping the reference answer from a training row (judges then work without one)."""
    max_rows: int | None = None
    dataloader_workers: int = 0
    """Worker processes that encode rows (chat template, tokenizer, image preprocessing) while the GPU trains."""

    # ---- optimisation ---------------------------------------------------------------------
    output_dir: str = "judge-out"
    max_steps: int = 0
    """Optimizer steps; 0 means `epochs` passes over the data."""
    epochs: float = 1.0
    per_device_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto': bf16 on a GPU that supports it, fp32 on CPU."""
    gradient_checkpointing: bool = False
    target_only_logits: bool = False
    """Apply the LM head only at target positions (same loss: mean cross-entropy over target tokens).
    Prompt and image positions then skip the vocabulary projection, which on a CPU costs more than a
    few decoder layers of a small model with a large vocabulary."""
    seed: int = 0

    # ---- logging, eval, checkpoints -------------------------------------------------------
    log_every: int = 10
    eval_every: int = 0
    """Steps between held-out evaluations (0: only at the end if there is eval data)."""
    eval_max_rows: int = 64
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 8
    save_every: int = 0
    """Steps between resumable checkpoints in output_dir/checkpoints/ (0: none)."""
    keep_checkpoints: int = 2
    resume: str | None = None
    """'latest' or a checkpoint folder to continue from (the step count continues)."""
    tensorboard: bool = True
    """Log to output_dir/runs when tensorboard is installed."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if isinstance(self.train_data, str):
            self.train_data = [self.train_data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        if not self.base_model:
            bad("base_model: required (a model folder or name)")
        if self.kind not in KINDS:
            bad(f"kind: must be one of {KINDS}, got {self.kind!r}")
        if self.finetune not in FINETUNES:
            bad(f"finetune: must be one of {FINETUNES}, got {self.finetune!r}")
        if self.mode not in MODES:
            bad(f"mode: must be one of {MODES}, got {self.mode!r}")
        if self.on_bad_row not in ("skip", "fail"):
            bad(f"on_bad_row: must be 'skip' or 'fail', got {self.on_bad_row!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            bad(f"precision: must be auto, bf16 or fp32, got {self.precision!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            bad(f"lr_schedule: must be cosine, linear or constant, got {self.lr_schedule!r}")
        if self.kind == "text" and self.train_projector:
            bad("train_projector=true conflicts with kind='text' (a text judge has no projector)")
        if self.finetune == "full" and self.merge_adapter_on_save:
            bad("merge_adapter_on_save=true conflicts with finetune='full' (there is no adapter)")
        if self.finetune == "full" and self.lora_target is not None:
            bad("lora_target is set but finetune='full' (LoRA options need finetune='lora')")
        if self.finetune == "lora" and self.freeze_embeddings:
            bad("freeze_embeddings=true conflicts with finetune='lora' (LoRA never trains the embeddings)")
        if self.finetune == "lora" and not self.freeze_vision_tower:
            bad("freeze_vision_tower=false conflicts with finetune='lora' (LoRA adapts only the language model)")
        if self.eval_data and self.eval_fraction:
            bad("eval_data and eval_fraction are both set: choose a held-out file or a fraction")
        if not 0.0 <= self.eval_fraction < 1.0:
            bad(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.reference_dropout <= 1.0:
            bad(f"reference_dropout: must be in [0, 1], got {self.reference_dropout}")
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            bad("max_steps/epochs: give max_steps > 0 or epochs > 0")
        for name in ("per_device_batch_size", "grad_accum", "lora_r", "max_length", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            bad(f"lr: must be > 0, got {self.lr}")
        if self.eval_every and not (self.eval_data or self.eval_fraction):
            bad("eval_every is set but there is no held-out data (eval_data or eval_fraction)")

    # ---- YAML round trip -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a recipe (YAML; nested sections are flattened: lora: {r: 8} -> lora_r) and apply overrides."""
        data: dict[str, Any] = {}
        base_dir = None
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"recipe not found: {p}")
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"recipe {p}: expected a mapping of fields, got {type(loaded).__name__}")
            data = _flatten(loaded)
            base_dir = p.resolve().parent
        flags = _flatten(overrides or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted((set(data) | set(flags)) - set(known))
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {unknown}; known fields: {sorted(known)}")
        if base_dir is not None:  # the recipe's own paths, before the flags (which are the cwd's)
            data = _resolve_paths(data, base_dir)
        data.update(flags)
        data = {k: _coerce(known[k], v) for k, v in data.items()}
        try:
            return cls(**data)
        except TypeError as e:  # e.g. a YAML list where a number belongs
            raise ConfigError(f"recipe: {e}") from e


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    nested_ok = {"image_rewrites"}  # mapping-valued fields stay mappings
    for k, v in d.items():
        key = (prefix + str(k)).replace(".", "_").replace("-", "_")
        if isinstance(v, dict) and key not in nested_ok:
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    """Turn flag strings into the field's type (YAML values already have theirs)."""
    if not isinstance(v, str):
        return v
    t = str(f.type)
    if v.lower() in ("none", "null") and "None" in t:
        return None
    if t.startswith("bool"):
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{f.name}: expected true/false, got {v!r}")
    try:
        if t.startswith("int"):
            return int(v)
        if t.startswith("float"):
            return float(v)
    except ValueError as e:
        raise ConfigError(f"{f.name}: expected {t}, got {v!r}") from e
    if t.startswith("list"):
        return [s for s in v.split(",") if s]
    if t.startswith("dict"):
        parsed = yaml.safe_load(v)
        if not isinstance(parsed, dict):
            raise ConfigError(f"{f.name}: expected a mapping like '{{a: b}}', got {v!r}")
        return parsed
    return v


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Recipe-relative paths -> absolute, so a recipe works from any working directory."""
    for key in ("train_data", "eval_data", "allowed_image_dirs"):
        if data.get(key):
            data[key] = [recipe_path(x, base) for x in (data[key] if isinstance(data[key], list) else [data[key]])]
    # output_dir stays relative to the working directory, like any command's output path
    for key in ("base_model", "image_root", "chat_template"):
        v = data.get(key)
        # chat_template may be Jinja text, base_model a hub name or a built-in tiny model
        if isinstance(v, str) and v and "\n" not in v and "{" not in v and not v.startswith("tiny:"):
            data[key] = recipe_path(v, base, model_name=key != "image_root")
    return data
