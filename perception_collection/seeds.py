"""Seed rubrics: the hand-written, fine-grained rubrics the teacher sees before it writes
image-specific ones.

The package ships `seed_rubrics.yaml` (about 60 rubrics in 35 categories: grounding, counting, OCR, charts,
hallucination, domain knowledge, safety, privacy, ...). A user may pass their own file in the same
shape::

    - name: object_counting          # unique key
      category: counting             # used to spread a sample across kinds of skill
      criteria: Does the response give the correct number of ...?
      scores:                        # exactly 1..5; a list of five strings is accepted too
        1: ...
        5: ...
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perception_collection.rows import SeedRubric
from vlm_judge.records import RecordError, Rubric

DEFAULT_SEEDS = Path(__file__).with_name("seed_rubrics.yaml")


class SeedError(ValueError):
    """The seed rubric file is unreadable or one of its entries is malformed (the message names it)."""


def _descriptions(entry: dict[str, Any], where: str) -> tuple[str, ...]:
    scores = entry.get("scores", entry.get("score_descriptions"))
    if isinstance(scores, dict):
        keys = sorted(scores, key=str)
        if sorted(str(k) for k in scores) != ["1", "2", "3", "4", "5"]:
            raise SeedError(f"{where}: 'scores' needs exactly the keys 1..5, got {keys}")
        descs = [scores.get(i, scores.get(str(i))) for i in range(1, 6)]
    elif isinstance(scores, list):
        if len(scores) != 5:
            raise SeedError(f"{where}: 'scores' needs five descriptions (1..5), got {len(scores)}")
        descs = list(scores)
    else:
        raise SeedError(f"{where}: missing 'scores' (five score descriptions, 1 = worst .. 5 = best)")
    for i, d in enumerate(descs, 1):
        if not isinstance(d, str) or not d.strip():
            raise SeedError(f"{where}: score {i} description is missing or empty")
    return tuple(d.strip() for d in descs)


def parse_seeds(data: Any, source: str = "<data>") -> list[SeedRubric]:
    """Validate already-loaded YAML data (a list of entries) into seed rubrics."""
    if isinstance(data, dict) and isinstance(data.get("seeds"), list):
        data = data["seeds"]
    if not isinstance(data, list) or not data:
        raise SeedError(f"{source}: expected a non-empty list of seed rubrics")
    out: list[SeedRubric] = []
    seen: dict[str, int] = {}
    for n, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise SeedError(f"{source}: entry #{n} is not a mapping")
        name = entry.get("name")
        where = f"{source}: seed #{n}" + (f" {name!r}" if name else "")
        if not isinstance(name, str) or not name.strip():
            raise SeedError(f"{where}: missing 'name'")
        if name in seen:
            raise SeedError(f"{where}: duplicate name (first used by seed #{seen[name]})")
        seen[name] = n
        category = entry.get("category")
        if not isinstance(category, str) or not category.strip():
            raise SeedError(f"{where}: missing 'category'")
        criteria = entry.get("criteria")
        if not isinstance(criteria, str) or not criteria.strip():
            raise SeedError(f"{where}: missing 'criteria'")
        try:
            rubric = Rubric(criteria.strip(), _descriptions(entry, where))
        except RecordError as e:
            raise SeedError(f"{where}: {e}") from e
        out.append(SeedRubric(name=name.strip(), category=category.strip(), rubric=rubric))
    return out


def _matches(category: str, wanted: str) -> bool:
    # 'domain' selects every 'domain_*' category; an exact name selects only itself
    return category == wanted or category.startswith(wanted + "_")


def load_seeds(path: str | None = None, categories: Sequence[str] | None = None) -> list[SeedRubric]:
    """Seed rubrics from `path` (default: the packaged seed_rubrics.yaml), optionally only those in
    `categories` ('domain' also selects 'domain_math', 'domain_physics', ...).

    Raises SeedError naming the bad entry (missing field, not five descriptions, duplicate name) or
    a requested category that no seed has.
    """
    import yaml

    p = Path(path) if path is not None else DEFAULT_SEEDS
    if not p.is_file():
        raise SeedError(f"seed rubric file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SeedError(f"{p}: not valid YAML: {e}") from e
    seeds = parse_seeds(data, str(p))
    if categories:
        known = sorted({s.category for s in seeds})
        unknown = [c for c in categories if not any(_matches(k, c) for k in known)]
        if unknown:
            raise SeedError(f"{p}: no seed rubric in categories {unknown}; known categories: {known}")
        seeds = [s for s in seeds if any(_matches(s.category, c) for c in categories)]
    return seeds


def sample_seeds(seeds: Sequence[SeedRubric], k: int, rng: random.Random) -> list[SeedRubric]:
    """k distinct seeds spread across categories: one per category (categories in random order)
    before any category gives a second. Deterministic for a given rng state; all seeds if k >= len."""
    if k <= 0 or not seeds:
        return []
    by_cat: dict[str, list[SeedRubric]] = defaultdict(list)
    for s in seeds:
        by_cat[s.category].append(s)
    cats = sorted(by_cat)
    rng.shuffle(cats)
    for c in cats:
        rng.shuffle(by_cat[c])
    out: list[SeedRubric] = []
    depth = 0
    while len(out) < min(k, len(seeds)):
        for c in cats:
            if depth < len(by_cat[c]):
                out.append(by_cat[c][depth])
                if len(out) == k:
                    break
        depth += 1
    return out
