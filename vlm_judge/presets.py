"""Published judges by name, and how a judge name becomes something a backend can load.

A preset names a published checkpoint and the template it was trained on. Its weights are found
offline, never downloaded at scoring time: first in the preset folder (`$VLM_JUDGE_PRESET_DIR/<name>/`,
where a converted or hand-placed copy goes), then in the user's Hugging Face cache (huggingface_hub's
cache lookup, no network). Weights still in the original LLaVA layout get an error naming the
`vlm-judge convert` command that makes them loadable; absent weights get one line saying so.

`locate_judge` settles any judge name before a model is loaded: a preset, an existing folder, a
cached hub model, 'mock', or a model served over HTTP. Anything else fails at once with "no judge
folder, preset or served model named X" instead of a hub error after a long wait.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PRESET_DIR_ENV = "VLM_JUDGE_PRESET_DIR"
"""Folder holding one subfolder per preset name; a subfolder found there is used before the HF cache."""


@dataclass(frozen=True)
class Preset:
    """A published judge."""

    model: str
    """Its Hugging Face repository id."""
    kind: str
    """'vision' or 'text'."""
    template: str
    """The prompt template it was trained on."""
    backend: str = "hf"
    original_layout: bool = False
    """Released as an original LLaVA checkpoint: needs `vlm-judge convert` before transformers loads it."""
    vision_tower: str | None = None
    """The CLIP tower an original-layout checkpoint names in `mm_vision_tower` (not stored in it)."""
    note: str = ""


_CLIP_336 = "openai/clip-vit-large-patch14-336"

PRESETS: dict[str, Preset] = {
    "prometheus-2-7b": Preset("prometheus-eval/prometheus-7b-v2.0", "text", "prometheus"),
    "prometheus-2-8x7b": Preset("prometheus-eval/prometheus-8x7b-v2.0", "text", "prometheus"),
    # Prometheus 1 (the format checked byte for byte is Prometheus 2's; version 1 reads the same sections)
    "prometheus-13b": Preset("kaist-ai/prometheus-13b-v1.0", "text", "prometheus"),
    "prometheus-7b": Preset("kaist-ai/prometheus-7b-v1.0", "text", "prometheus"),
    "prometheus-vision-7b": Preset("kaist-ai/prometheus-vision-7b-v1.0", "vision", "prometheus-vision",
                                   original_layout=True, vision_tower=_CLIP_336),
    "prometheus-vision-13b": Preset("kaist-ai/prometheus-vision-13b-v1.0", "vision", "prometheus-vision",
                                    original_layout=True, vision_tower=_CLIP_336),
    # an untuned baseline: the LLaVA-1.5 the vision judge was tuned from, shown the same prompt
    "llava-1.5-7b": Preset("llava-hf/llava-1.5-7b-hf", "vision", "prometheus-vision",
                           note="untuned baseline (not a trained judge)"),
}


class JudgeNotFound(FileNotFoundError):
    """A judge name that is no folder, preset or served model, or a preset whose weights are not usable here."""


@dataclass(frozen=True)
class Located:
    """What a judge name resolved to."""

    name: str
    """The name judgments record (a preset's hub id, else the name given)."""
    path: str
    """What the backend loads (a folder, a hub id, or the served model's name)."""
    template: str | None = None
    """The preset's template (None: the judge card's or the default)."""


def preset_folder(name: str) -> Path | None:
    """The preset's local folder under $VLM_JUDGE_PRESET_DIR, if there is one."""
    root = os.environ.get(PRESET_DIR_ENV)
    if not root:
        return None
    folder = Path(root) / name
    return folder if folder.is_dir() else None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The repository's folder in the local Hugging Face cache; a lookup only, never a download."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def is_original_llava(folder: str | Path) -> bool:
    """Whether a folder holds an original LLaVA checkpoint (`LlavaLlamaForCausalLM`, `mm_*` config fields)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    return "LlavaLlamaForCausalLM" in archs or ("mm_vision_tower" in config and "vision_config" not in config)


def resolve_preset(name: str) -> Located:
    """A preset's loadable local folder, or a JudgeNotFound that says what to do."""
    preset = PRESETS[name]
    folder = preset_folder(name) or _cached_snapshot(preset.model)
    if folder is None:
        where = f"${PRESET_DIR_ENV}/{name}/ or " if os.environ.get(PRESET_DIR_ENV) else ""
        get = f"huggingface-cli download {preset.model}"
        if preset.original_layout:
            get += f", then vlm-judge convert (see docs/serving.md) into ${PRESET_DIR_ENV}/{name}"
        raise JudgeNotFound(f"preset {name!r} ({preset.model}): weights not found in {where}the Hugging Face cache "
                            f"and not downloaded at scoring time; get them with: {get}")
    if is_original_llava(folder):
        tower = preset.vision_tower or "CLIP_FOLDER"
        dst = f"${PRESET_DIR_ENV}/{name}" if os.environ.get(PRESET_DIR_ENV) else f"{name}-hf"
        raise JudgeNotFound(f"preset {name!r}: {folder} holds the original LLaVA layout, which transformers does "
                            f"not load; convert it once: vlm-judge convert {folder} --vision-tower <folder of "
                            f"{tower}> --out {dst} (then use --judge {dst})")
    return Located(name=preset.model, path=str(folder), template=preset.template)


def _is_hub_id(name: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def locate_judge(name: str, backend: str | None = None, served: bool = False) -> Located:
    """Settle a judge name before anything is loaded.

    `backend`: the backend named by the caller (None: chosen later from the card, i.e. a local one).
    `served`: a server URL was given, so the name is the served model's and nothing local is checked.
    """
    preset = PRESETS.get(name)
    # only the backends that load weights here need them found; a server, the mock or a backend the user
    # registered takes the name as it is
    if served or name == "mock" or backend not in (None, "hf", "vllm"):
        if preset is not None and backend == "mock":  # the mock records the published name; no weights needed
            return Located(name=preset.model, path=preset.model, template=preset.template)
        # a served preset is still prompted in its own format (prompts are rendered here, not on the server)
        return Located(name=name, path=name, template=preset.template if preset else None)
    if preset is not None:
        return resolve_preset(name)
    try:
        exists = Path(name).exists()
    except (OSError, ValueError):  # a name no file system accepts (too long, a NUL byte)
        exists = False
    if exists:
        return Located(name=name, path=name)
    if _is_hub_id(name):
        if _cached_snapshot(name) is not None or not _offline():
            return Located(name=name, path=name)
        why = " (a hub id not in the Hugging Face cache, and HF_HUB_OFFLINE is set)"
    else:
        why = ""
    raise JudgeNotFound(f"no judge folder, preset or served model named {name!r}{why}; presets: "
                        f"{', '.join(sorted(PRESETS))}; a served model needs --base-url")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def preset_template(name: str) -> str | None:
    """The template a preset name picks (None for other names)."""
    preset = PRESETS.get(name)
    return preset.template if preset else None


__all__ = ["PRESETS", "PRESET_DIR_ENV", "JudgeNotFound", "Located", "Preset", "is_original_llava", "locate_judge",
           "preset_folder", "preset_template", "resolve_preset"]
