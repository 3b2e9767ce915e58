"""Judge prompt templates and the one renderer that turns a JudgeRequest into a Prompt.

The scorer and the training code both render through `render`, so the prompt a judge is trained
on and the prompt it is scored with cannot drift apart.

Templates keep the Prometheus family's section structure and headers (task description,
instruction, response(s), reference answer, score rubric, feedback) so that published
Prometheus / Prometheus-Vision weights see the layout they were trained on; the sentences of the
task descriptions are our own ('default', 'prefix'). Published fine-tuned judges are shown the exact
input format they were trained on instead: 'prometheus' (Prometheus 2, as prometheus-eval renders it,
with its system prompts) and 'prometheus-vision' (Prometheus-Vision's published rows); presets and
converted folders pick them. A user can load a template from a YAML/JSON file with the same
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
    rubric_style: str = "default"
    """How {rubric} is written: 'default' ('[criteria]' + 'Score N:' lines when absolute, the bare
    criteria when relative), 'bracketed' ('[criteria]' in both modes, as prometheus-eval does) or
    'plain' (the criteria without brackets, then the 'Score N:' lines: Prometheus-Vision's rows)."""
    strip: bool = True
    """Strip surrounding whitespace from the values; published formats insert them as given."""

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


# Prometheus 2's published input format (prometheus-eval 0.1.20's ABSOLUTE_PROMPT, RELATIVE_PROMPT and
# their _WO_REF forms, with its system prompts). Its wording ("a evaluation criteria", "assess") is the
# interface the published weights were trained on: do not correct it.
_P2_ABS_SYSTEM = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on specific criteria, "
    "ensuring each assessment reflects the absolute standards set for performance."
)
_P2_REL_SYSTEM = (
    "You are a fair judge assistant assigned to deliver insightful feedback that compares individual "
    "performances, highlighting how each stands relative to others within the same cohort."
)
_P2_ABS_TASK = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), a response to evaluate, {ref}and a score rubric "
    "representing a evaluation criteria are given.\n"
    "1. Write a detailed feedback that assess the quality of the response strictly based on the given score "
    "rubric, not evaluating in general.\n"
    "2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the "
    "score rubric.\n"
    '3. The output format should look as follows: "(write a feedback for criteria) [RESULT] (an integer number '
    'between 1 and 5)"\n'
    "4. Please do not generate any other opening, closing, and explanations.\n\n"
)
_P2_REL_TASK = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), a response to evaluate, {ref}and a score rubric "
    "representing a evaluation criteria are given.\n"
    "1. Write a detailed feedback that assess the quality of two responses strictly based on the given score "
    "rubric, not evaluating in general.\n"
    "2. After writing a feedback, choose a better response between Response A and Response B. You should refer "
    "to the score rubric.\n"
    '3. The output format should look as follows: "(write a feedback for criteria) [RESULT] (A or B)"\n'
    "4. Please do not generate any other opening, closing, and explanations.\n\n"
)
_P2_ABS_SECTIONS = (
    "###The instruction to evaluate:\n{instruction}\n\n###Response to evaluate:\n{response}\n\n{ref}"
    "###Score Rubrics:\n{rubric}\n\n###Feedback: "
)
_P2_REL_SECTIONS = (
    "###Instruction:\n{instruction}\n\n###Response A:\n{response_a}\n\n###Response B:\n{response_b}\n\n"
    "{ref}###Score Rubric:\n{rubric}\n\n###Feedback: "
)
# Prometheus-Vision's published rows (absolute grading only): the same sections with its own task
# wording, "Feedback:" unquoted in the format line, the bare criteria, and no space after "###Feedback:".
# Without a reference answer its clause and section are left out, as Prometheus 2's _WO_REF forms do.
_PV_ABS_TASK = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), a response to evaluate, {ref}and a score rubric "
    "representing an evaluation criterion is given.\n"
    "1. Write a detailed feedback that assesses the quality of the response strictly based on the given score "
    "rubric, not evaluating in general.\n"
    "2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the "
    "score rubric.\n"
    "3. The output format should look as follows: Feedback: (write a feedback for criteria) [RESULT] (an "
    "integer number between 1 and 5)\n"
    "4. Please do not generate any other opening, closing, and explanations.\n\n"
)


def _published(name: str, task: str, sections: str, ref_clause: str, ref_section: str, relative: bool,
               system: str | None, rubric_style: str, feedback_tail: str = "") -> JudgeTemplate:
    def body(ref: bool) -> str:
        text = task.replace("{ref}", ref_clause if ref else "") + sections.replace("{ref}", ref_section if ref else "")
        return text[: -len("###Feedback: ")] + feedback_tail if feedback_tail else text

    return JudgeTemplate(name=name, mode="relative" if relative else "absolute", body=body(True),
                         body_no_ref=body(False), system=system, rubric_style=rubric_style, strip=False)


_P2_ABS = _published("prometheus", _P2_ABS_TASK, _P2_ABS_SECTIONS, "a reference answer that gets a score of 5, ",
                     "###Reference Answer (Score 5):\n{reference_answer}\n\n", False, _P2_ABS_SYSTEM, "bracketed")
_P2_REL = _published("prometheus", _P2_REL_TASK, _P2_REL_SECTIONS, "a reference answer, ",
                     "###Reference Answer:\n{reference_answer}\n\n", True, _P2_REL_SYSTEM, "bracketed")
# The vision judge's system line is vicuna_v1's, which its chat template writes (no system turn here).
_PV_ABS = _published("prometheus-vision", _PV_ABS_TASK, _P2_ABS_SECTIONS, "a reference answer that gets a score of 5, ",
                     "###Reference Answer (Score 5):\n{reference_answer}\n\n", False, None, "plain",
                     feedback_tail="###Feedback:")
TEMPLATES["prometheus"] = (_P2_ABS, _P2_REL)
# Prometheus-Vision was trained on absolute grading only; pairs get Prometheus 2's relative prompt.
TEMPLATES["prometheus-vision"] = (_PV_ABS, replace(_P2_REL, name="prometheus-vision", system=None))


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


def _rubric_text(request: JudgeRequest, style: str) -> str:
    rubric = request.rubric
    if style == "plain":
        scores = [f"Score {i}: {d.strip()}" for i, d in enumerate(rubric.score_descriptions, 1)]
        lines = [rubric.criteria.strip(), *scores]
        return "\n".join(lines if request.mode == "absolute" else lines[:1])
    if request.mode == "absolute":
        return rubric.to_text()
    return f"[{rubric.criteria.strip()}]" if style == "bracketed" else rubric.criteria.strip()


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
    def clean(text: str | None) -> str:
        return (text or "").strip() if template.strip else (text or "")

    values = {
        "instruction": clean(request.instruction),
        "response": clean(request.response),
        "response_a": clean(request.response),
        "response_b": clean(request.response_b),
        "reference_answer": clean(request.reference_answer),
        "rubric": _rubric_text(request, template.rubric_style),
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
