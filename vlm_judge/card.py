"""The judge card: `vlm_judge.json` in a judge folder says how to load and prompt the judge.

Fields: `backend` (default 'hf'), `template`, `kind` ('vision' | 'text'), `base_model` (for a LoRA
adapter; a path relative to the folder is resolved against it), `adapter`, `version`, plus anything
a writer adds. This module is the only place the file is read or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "vlm_judge.json"


class CardError(ValueError):
    """A judge card exists but cannot be read."""


def card_path(folder: str | Path) -> Path:
    return Path(folder) / CARD_FILE


def has_card(folder: str | Path) -> bool:
    """Whether `folder` is a judge folder (holds a card)."""
    try:
        return card_path(folder).is_file()
    except (OSError, ValueError):  # a name that is not a path (a hub id, 'mock', a NUL byte)
        return False


def load_card(folder: str | Path, required: bool = False) -> dict[str, Any]:
    """The folder's card, {} when it has none (or an error when `required`)."""
    p = card_path(folder)
    if not has_card(folder):
        if required:
            raise FileNotFoundError(f"{folder} is not a judge folder: no {CARD_FILE}")
        return {}
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{p}: unreadable judge card: {e}") from e
    if not isinstance(card, dict):
        raise CardError(f"{p}: a judge card must be a JSON object")
    return card


def save_card(folder: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write the card (pretty JSON) and return it."""
    card_path(folder).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return card


def resolve_base_model(folder: str | Path, base: str | None) -> str | None:
    """A card's `base_model` as a loadable name: relative paths are relative to the judge folder,
    so a judge folder can be moved or copied together with its base."""
    if not base:
        return base
    candidate = Path(folder) / base
    if not Path(base).is_absolute() and candidate.exists():
        return str(candidate)
    return base


def default_backend(name_or_path: str, card: dict[str, Any] | None = None, base_urls: bool = False) -> str:
    """The backend used when none is named: 'openai' when a server URL is given (also for the
    name 'mock': a served mock is tested that way), 'mock' for 'mock', else the card's, else 'hf'."""
    if base_urls:
        return "openai"
    if name_or_path == "mock":
        return "mock"
    card = load_card(name_or_path) if card is None else card
    return str(card.get("backend", "hf"))


def default_kind(name_or_path: str, card: dict[str, Any] | None = None) -> str:
    """'vision' or 'text': the card's `kind`, else 'vision'."""
    card = load_card(name_or_path) if card is None else card
    return str(card.get("kind", "vision"))


__all__ = ["CARD_FILE", "CardError", "card_path", "default_backend", "default_kind", "has_card", "load_card",
           "resolve_base_model", "save_card"]
