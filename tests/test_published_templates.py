"""The published judges' input formats, verified byte for byte against published text.

- `prometheus-vision`: every published Prometheus-Vision row in tests/data/prometheus-vision is
  re-rendered from its parts (eval rows: the orig_* fields; training rows: the parts read back out
  of the human turn) and must equal the published prompt exactly.
- `prometheus`: renders equal prometheus-eval 0.1.20's own prompts and system prompts on the same
  inputs (the peer's `prompts.py` is loaded alone: importing the package pulls fastchat).
- The parser reads the published training targets' verdicts.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from vlm_judge.parse import parse_output
from vlm_judge.prompts import get_template, render
from vlm_judge.records import ImageRef, JudgeRequest, Rubric

DATA = Path(__file__).parent / "data" / "prometheus-vision"
EVAL_ROWS = [json.loads(line) for line in (DATA / "sample_eval_data.jsonl").read_text(encoding="utf-8").splitlines()]
TRAIN_ROWS = json.loads((DATA / "sample_train_data.json").read_text(encoding="utf-8"))

# the sections of a published absolute prompt, read back out of the rendered text
_PARTS = re.compile(
    r"###Task Description:\n.*?\n\n###The instruction to evaluate:\n(?P<instruction>.*?)\n\n"
    r"###Response to evaluate:\n(?P<response>.*?)\n\n###Reference Answer \(Score 5\):\n(?P<reference>.*?)\n\n"
    r"###Score Rubrics:\n(?P<criteria>.*?)\n(?P<scores>Score 1: .*)\n\n###Feedback:",
    re.S,
)


def _vision_request(instruction: str, response: str, reference: str, rubric: Rubric, image: str) -> JudgeRequest:
    return JudgeRequest(instruction=instruction, response=response, reference_answer=reference, rubric=rubric,
                        images=(ImageRef(path=image),), id="r")


@pytest.mark.parametrize("k", range(len(EVAL_ROWS)))
def test_published_eval_rows_rerender_byte_for_byte(k):
    row = EVAL_ROWS[k]
    rubric = Rubric(row["orig_criteria"], tuple(row[f"orig_score{i}_description"] for i in range(1, 6)))
    req = _vision_request(row["orig_instruction"], row["original_response"], row["orig_reference_answer"], rubric,
                          row["image"])
    prompt = render(req, "prometheus-vision")
    assert prompt.user == row["instruction"]
    assert prompt.system is None  # the vicuna_v1 system line comes from the converted folder's chat template


@pytest.mark.parametrize("k", range(len(TRAIN_ROWS)))
def test_published_training_rows_human_turn_rerenders_byte_for_byte(k):
    human, gpt = TRAIN_ROWS[k]["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    text = human["value"][len("<image>\n"):]
    m = _PARTS.fullmatch(text)
    assert m, "published training row does not have the Prometheus-Vision section layout"
    rubric = Rubric.from_text(m["criteria"] + "\n" + m["scores"])
    req = _vision_request(m["instruction"], m["response"], m["reference"], rubric, TRAIN_ROWS[k]["image"])
    assert render(req, "prometheus-vision").user == text
    # the image goes first in the user turn, then a newline: LLaVA's layout, written by the chat template
    assert human["value"] == "<image>\n" + render(req, "prometheus-vision").user


def test_published_training_targets_parse_to_their_score():
    for row in TRAIN_ROWS:
        target = row["conversations"][1]["value"]
        expected = int(re.search(r"\[RESULT\] (\d)$", target).group(1))
        got = parse_output(target, "absolute")
        assert got.ok and got.verdict == expected
        assert f"So the overall score is {expected}." in target  # the two forms agree in the published rows
        assert not got.feedback.endswith(f"So the overall score is {expected}.") and "[RESULT]" not in got.feedback
        assert got.feedback and got.feedback in target


def test_vision_template_without_reference_drops_the_clause_and_the_section():
    row = EVAL_ROWS[0]
    rubric = Rubric(row["orig_criteria"], tuple(row[f"orig_score{i}_description"] for i in range(1, 6)))
    req = _vision_request(row["orig_instruction"], row["original_response"], "", rubric, row["image"])
    text = render(req, "prometheus-vision").user
    assert "###Reference Answer" not in text and "reference answer" not in text
    with_ref = row["instruction"].replace("a reference answer that gets a score of 5, ", "")
    with_ref = re.sub(r"###Reference Answer \(Score 5\):\n.*?\n\n(?=###Score Rubrics:)", "", with_ref, flags=re.S)
    assert text == with_ref


# ---- prometheus-eval as the reference for the text template --------------------------------------


def _peer_prompts():
    """prometheus-eval's prompts.py, loaded alone (it imports nothing; the package's __init__ pulls fastchat)."""
    spec = importlib.util.find_spec("prometheus_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("prometheus-eval is not installed: pip install --no-deps prometheus-eval==0.1.20")
    path = Path(list(spec.submodule_search_locations)[0]) / "prompts.py"
    mod_spec = importlib.util.spec_from_file_location("_peer_prometheus_prompts", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


INSTRUCTION = "Write a haiku about {tides}.\nInput: the moon"
RESPONSE = "The moon pulls the sea,\nwaves climb and fall back again.\n  "  # trailing spaces are kept, as the peer does
RESPONSE_B = "Tides are caused by wind."
REFERENCE = "Silver moon above / the ocean rises to meet / and sinks back to sleep"
CRITERIA = ("helpfulness", "harmlessness", "honesty", "factual_validity", "reasoning")


@pytest.mark.parametrize("criteria", CRITERIA)
@pytest.mark.parametrize("with_ref", [True, False])
def test_prometheus_absolute_equals_prometheus_eval(criteria, with_ref):
    peer = _peer_prompts()
    peer_rubric = peer.load_rubric(criteria, "absolute")
    expected = peer.get_prompt_template("absolute", with_ref).format(
        instruction=INSTRUCTION, response=RESPONSE, rubric=peer_rubric, reference_answer=REFERENCE)
    req = JudgeRequest(instruction=INSTRUCTION, response=RESPONSE, rubric=Rubric.from_text(peer_rubric),
                       reference_answer=REFERENCE if with_ref else None, id="x")
    prompt = render(req, "prometheus")
    assert prompt.user == expected
    assert prompt.system == peer.ABS_SYSTEM_PROMPT


@pytest.mark.parametrize("criteria", CRITERIA)
@pytest.mark.parametrize("with_ref", [True, False])
def test_prometheus_relative_equals_prometheus_eval(criteria, with_ref):
    peer = _peer_prompts()
    peer_rubric = peer.load_rubric(criteria, "relative")  # the bracketed criteria line
    expected = peer.get_prompt_template("relative", with_ref).format(
        instruction=INSTRUCTION, response_A=RESPONSE, response_B=RESPONSE_B, rubric=peer_rubric,
        reference_answer=REFERENCE)
    req = JudgeRequest(instruction=INSTRUCTION, response=RESPONSE, response_b=RESPONSE_B,
                       rubric=Rubric.from_text(peer_rubric), reference_answer=REFERENCE if with_ref else None,
                       id="x", mode="relative")
    prompt = render(req, "prometheus")
    assert prompt.user == expected
    assert prompt.system == peer.REL_SYSTEM_PROMPT


def test_published_templates_leave_default_alone():
    assert get_template("default", "absolute").rubric_style == "default" and get_template("default", "absolute").strip
    assert get_template("prometheus", "absolute").body != get_template("default", "absolute").body
    # the two published formats differ in wording: each judge gets its own
    assert "a evaluation criteria are given" in get_template("prometheus", "absolute").body
    assert "an evaluation criterion is given" in get_template("prometheus-vision", "absolute").body
