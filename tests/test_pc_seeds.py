"""Seed rubrics: the packaged file loads and is well-formed; bad files fail naming the entry;
sampling spreads across categories."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from perception_collection.seeds import SeedError, load_seeds, sample_seeds
from tests.samples import PROMETHEUS_VISION
from vlm_judge.prompts import render
from vlm_judge.records import JudgeRequest, Rubric

SAMPLES = PROMETHEUS_VISION

REQUIRED_TOPICS = [
    "grounding", "counting", "spatial", "ocr", "charts", "tables", "attributes", "hallucination",
    "recognition", "scene", "action", "reasoning", "commonsense", "temporal_causal", "domain_math",
    "domain_physics", "domain_chemistry", "domain_biology", "domain_medicine", "domain_art",
    "domain_history", "domain_economics", "domain_engineering", "instruction_following", "completeness",
    "conciseness", "safety", "privacy", "style", "helpfulness", "calibration", "culture",
]


def test_packaged_seeds_cover_the_skills():
    seeds = load_seeds()
    assert 45 <= len(seeds) <= 80
    cats = {s.category for s in seeds}
    assert not set(REQUIRED_TOPICS) - cats, set(REQUIRED_TOPICS) - cats
    assert len({s.name for s in seeds}) == len(seeds)
    for s in seeds:
        assert s.rubric.complete
        descs = s.rubric.score_descriptions
        # five distinguishable levels: no two descriptions alike
        assert len(set(descs)) == 5, s.name
        # usable by the one renderer, and round-trips through the text form
        assert Rubric.from_text(s.rubric.to_text()) == s.rubric
        prompt = render(JudgeRequest("q?", "a.", s.rubric)).user
        assert f"Score 5: {descs[4]}" in prompt


def test_seed_wording_is_our_own():
    """No criterion or score description is copied from the published Prometheus-Vision rows."""
    published: set[str] = set()
    for line in (SAMPLES / "sample_eval_data.jsonl").read_text().splitlines():
        row = json.loads(line)
        published.add(row["orig_criteria"].strip().lower())
        published.update(row[f"orig_score{i}_description"].strip().lower() for i in range(1, 6))
    for row in json.loads((SAMPLES / "sample_train_data.json").read_text()):
        text = row["conversations"][0]["value"].lower()
        published.update(p.strip() for p in text.split("\n") if len(p.strip()) > 30)
    ours = []
    for s in load_seeds():
        ours.append(s.rubric.criteria.lower())
        ours.extend(d.lower() for d in s.rubric.score_descriptions)
    for text in ours:
        assert not any(text in p or p in text for p in published if len(p) > 30), text


def test_category_filter_and_prefix():
    counting = load_seeds(categories=["counting"])
    assert counting and all(s.category == "counting" for s in counting)
    domain = load_seeds(categories=["domain"])
    assert {s.category for s in domain} >= {"domain_math", "domain_physics", "domain_art"}
    with pytest.raises(SeedError, match="no seed rubric in categories \\['astrology'\\]"):
        load_seeds(categories=["astrology"])


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "seeds.yaml"
    p.write_text(text)
    return str(p)


GOOD = """
- name: a
  category: c1
  criteria: Is it right?
  scores: {1: w1, 2: w2, 3: w3, 4: w4, 5: w5}
- name: b
  category: c2
  criteria: Is it short?
  scores: [s1, s2, s3, s4, s5]
"""


def test_user_file_and_errors_name_the_entry(tmp_path):
    seeds = load_seeds(_write(tmp_path, GOOD))
    assert [s.name for s in seeds] == ["a", "b"]
    assert seeds[0].rubric.score_descriptions == ("w1", "w2", "w3", "w4", "w5")
    bad_four = GOOD + "- name: c\n  category: c1\n  criteria: x?\n  scores: [1a, 2a, 3a, 4a]\n"
    with pytest.raises(SeedError, match=r"seed #2 'c': 'scores' needs five descriptions"):
        load_seeds(_write(tmp_path, bad_four))
    dup = GOOD + "- name: a\n  category: c3\n  criteria: x?\n  scores: [1, 2, 3, 4, 5]\n"
    with pytest.raises(SeedError, match=r"seed #2 'a': duplicate name"):
        load_seeds(_write(tmp_path, dup))
    empty_desc = GOOD.replace("4: w4", "4: ''")
    with pytest.raises(SeedError, match=r"seed #0 'a': score 4 description is missing"):
        load_seeds(_write(tmp_path, empty_desc))
    no_crit = GOOD.replace("  criteria: Is it short?\n", "")
    with pytest.raises(SeedError, match=r"seed #1 'b': missing 'criteria'"):
        load_seeds(_write(tmp_path, no_crit))
    with pytest.raises(SeedError, match="not found"):
        load_seeds(str(tmp_path / "nope.yaml"))


def test_sample_spreads_across_categories_and_is_seeded():
    seeds = load_seeds()
    n_cats = len({s.category for s in seeds})
    picked = sample_seeds(seeds, 8, random.Random(0))
    assert len(picked) == 8 and len({s.name for s in picked}) == 8
    assert len({s.category for s in picked}) == 8  # one per category before any repeats
    assert [s.name for s in sample_seeds(seeds, 8, random.Random(0))] == [s.name for s in picked]
    assert [s.name for s in sample_seeds(seeds, 8, random.Random(1))] != [s.name for s in picked]
    # more than there are categories: every category once, then second picks
    many = sample_seeds(seeds, n_cats + 3, random.Random(2))
    counts = Counter(s.category for s in many)
    assert len(counts) == n_cats and max(counts.values()) == 2
    assert len(sample_seeds(seeds, 10_000, random.Random(3))) == len(seeds)
    assert sample_seeds(seeds, 0, random.Random(3)) == []
