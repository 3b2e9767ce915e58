"""Judge prompt templates and the one renderer that turns a JudgeRequest into a Prompt.

The scorer and the training code both render through `render`, so the prompt a judge is trained
on and the prompt it is scored with cannot drift apart.

Templates keep the Prometheus family's section structure and headers (task description,
instruction, response(s), reference answer, score rubric, feedback) so that published
Prometheus / Prometheus-Vision weights see the layout they were trained on; the sentences of the
task descriptions are our own. A user can load a template from a YAML/JSON file with the same
fields (`load_template`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vlm_judge.backends.base import Prompt
from vlm_judge.records import JudgeRequest, Verdict

# Fields a template may reference as {name}; anything else in braces is left alone, so response
# text containing braces (code, JSON) is never mistaken for a placeholder.
FIELDS = ("instruction", "response", "response_a", "response_b", "reference_answer", "rubric")
_FIELD_RE = re.compile(r"\{(" + "|".join(FIELDS) + r")\}")

_ABS_TASK = (
    "###Task Description:\n"
    "You are given an instruction{maybe_input}, a response to evaluate,{maybe_ref} and a score rubric "
    "that states one evaluation criterion.{maybe_image}\n"
    "1. Write feedback that judges the response only against the score rubric, not on general quality.\n"
    "2. After the feedback, give a score: an integer from 1 to 5, chosen with the rubric.\n"
    '3. Use exactly this output format: "Feedback: (your feedback on the criterion) [RESULT] '
    '(an integer between 1 and 5)"\n'
    "4. Do not write any other opening, closing or explanation.\n\n"
)
_REL_TASK = (
    "###Task Description:\n"
    "You are given an instruction{maybe_input}, two responses to compare (Response A and Response B),"
    "{maybe_ref} and a rubric that states one evaluation criterion.{maybe_image}\n"
    "1. Write feedback that compares the two responses only against the rubric, not on general quality.\n"
    "2. After the feedback, name the better response: A or B.\n"
    '3. Use exactly this output format: "Feedback: (your comparison on the criterion) [RESULT] (A or B)"\n'
    "4. Do not write any other opening, closing or explanation.\n\n"
)
_ABS_SYSTEM = (
    "You are an impartial judge. You grade a response strictly against the given rubric, explain "
    "the grade in feedback, and hold every response to the same standard."
)
_REL_SYSTEM = (
    "You are an impartial judge. You compare two responses strictly against the given rubric, "
    "explain your choice in feedback, and ignore the order in which the responses appear."
)


def _task(base: str, ref: bool, vision: bool, relative: bool) -> str:
    who = "a winning answer" if relative else "a reference answer that earns a score of 5"
    return base.format(
        maybe_input=" (which may contain an input)",
        maybe_ref=f" {who}," if ref else "",
        maybe_image=" An image is given with the instruction; judge the response against what the image shows."
        if vision
        else "",
    )


@dataclass(frozen=True)
class JudgeTemplate:
    """One prompt layout. `body` uses {instruction}, {response} / {response_a} {response_b},
    {reference_answer} and {rubric}."""

    name: str
    mode: str
    """'absolute' or 'relative'."""
    body: str
    """The user turn, reference section included."""
    body_no_ref: str
    """The user turn when the request has no reference answer."""
    system: str | None = None
    vision_body: str | None = None
    """Variant used when the request carries images (None: use `body`)."""
    vision_body_no_ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sections(relative: bool, ref: bool, response_last: bool) -> str:
    """The Prometheus section order; `response_last` moves the response(s) after everything the
    graded responses to one instruction share, so that prefix is computed once."""
    if relative:
        resp = "###Response A:\n{response_a}\n\n###Response B:\n{response_b}\n\n"
        ref_s = "###Reference Answer:\n{reference_answer}\n\n" if ref else ""
        rubric = "###Score Rubric:\n{rubric}\n\n"
    else:
        resp = "###Response to evaluate:\n{response}\n\n"
        ref_s = "###Reference Answer (Score 5):\n{reference_answer}\n\n" if ref else ""
        rubric = "###Score Rubrics:\n{rubric}\n\n"
    instr = "###The instruction to evaluate:\n{instruction}\n\n"
    if response_last:
        return instr + ref_s + rubric + resp + "###Feedback: "
    return instr + resp + ref_s + rubric + "###Feedback: "


def _make(name: str, relative: bool, response_last: bool = False) -> JudgeTemplate:
    base = _REL_TASK if relative else _ABS_TASK

    def body(ref: bool, vision: bool) -> str:
        return _task(base, ref, vision, relative) + _sections(relative, ref, response_last)

    return JudgeTemplate(
        name=name,
        mode="relative" if relative else "absolute",
        body=body(True, False),
        body_no_ref=body(False, False),
        system=_REL_SYSTEM if relative else _ABS_SYSTEM,
        vision_body=body(True, True),
        vision_body_no_ref=body(False, True),
    )


# name -> (absolute template, relative template)
TEMPLATES: dict[str, tuple[JudgeTemplate, JudgeTemplate]] = {
    # the published-compatible layout: response before reference and rubric
    "default": (_make("default", False), _make("default", True)),
    # everything the graded responses share first, the response last: for our own trained judges
    "prefix": (_make("prefix", False, True), _make("prefix", True, True)),
}


def get_template(name_or_path: str | Path, mode: str) -> JudgeTemplate:
    """A template by registered name, or loaded from a YAML/JSON file (one template per file,
    or a mapping with 'absolute' and 'relative' keys)."""
    key = str(name_or_path)
    if key in TEMPLATES:
        return TEMPLATES[key][0 if mode == "absolute" else 1]
    return load_template(name_or_path, mode)


def load_template(path: str | Path, mode: str) -> JudgeTemplate:
    """Load a user template file; fails with the missing field's name."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"unknown template {str(path)!r}: not a registered name {sorted(TEMPLATES)} nor a file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if mode in data and isinstance(data[mode], dict):
        data = data[mode]
    data.setdefault("name", p.stem)
    data.setdefault("mode", mode)
    data.setdefault("body_no_ref", data.get("body"))
    for required in ("body",):
        if not data.get(required):
            raise ValueError(f"template file {p}: missing field '{required}'")
    if data["mode"] != mode:
        raise ValueError(f"template file {p} is for mode {data['mode']!r}, not {mode!r}")
    known = set(JudgeTemplate.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"template file {p}: unknown fields {sorted(unknown)}")
    return JudgeTemplate(**data)


def _fill(body: str, values: dict[str, str]) -> str:
    # one pass over the template only: values are never re-scanned for placeholders
    return _FIELD_RE.sub(lambda m: values.get(m.group(1), ""), body)


def render(request: JudgeRequest, template: JudgeTemplate | str = "default") -> Prompt:
    """Render a request into the prompt the judge sees. The single way prompts are built."""
    if isinstance(template, str):
        template = get_template(template, request.mode)
    if template.mode != request.mode:
        raise ValueError(f"template {template.name!r} is {template.mode}, request {request.id!r} is {request.mode}")
    has_ref = bool(request.reference_answer and request.reference_answer.strip())
    vision = bool(request.images)
    if vision and template.vision_body:
        body = template.vision_body if has_ref else (template.vision_body_no_ref or template.vision_body)
    else:
        body = template.body if has_ref else template.body_no_ref
    values = {
        "instruction": request.instruction.strip(),
        "response": request.response.strip(),
        "response_a": request.response.strip(),
        "response_b": (request.response_b or "").strip(),
        "reference_answer": (request.reference_answer or "").strip(),
        "rubric": request.rubric.to_text() if request.mode == "absolute" else request.rubric.criteria.strip(),
    }
    return Prompt(user=_fill(body, values), system=template.system, images=request.images)


def swapped(request: JudgeRequest) -> JudgeRequest:
    """The same relative request with responses A and B exchanged (for position-swap checks)."""
    if request.mode != "relative":
        raise ValueError("only relative requests can be swapped")
    return replace(request, response=request.response_b, response_b=request.response)


def format_target(feedback: str, verdict: Verdict) -> str:
    """The training target: feedback, then the verdict in both forms the parser reads.

    Published Prometheus-Vision targets end '... So the overall score is N.\\n[RESULT] N'.
    """
    fb = feedback.strip()
    if verdict in ("A", "B"):
        return f"{fb} So the better response is {verdict}.\n[RESULT] {verdict}"
    if verdict not in (1, 2, 3, 4, 5):
        raise ValueError(f"a training target needs a score 1..5 or A/B, got {verdict!r}")
    return f"{fb} So the overall score is {verdict}.\n[RESULT] {verdict}"
