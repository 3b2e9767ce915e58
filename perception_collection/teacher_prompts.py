"""The words the LLM teacher is given for each stage (our own wording).

Every prompt asks for one JSON object with a fixed key, so the output can be checked field by
field; the image itself travels beside the text (the backend places it). Placeholders are filled
with `str.format`, so literal braces in the JSON examples are doubled.
"""

from __future__ import annotations

SYSTEM = (
    "You help build training data for an AI judge that grades answers about images. You look "
    "carefully at the image, use only what is visible in it or stated in the notes you are given, "
    "and reply with a single JSON object and nothing else."
)

CONTEXT = "Notes about the image (from its dataset; may be incomplete):\n{context}\n\n"
"""Shown before each task when the source has text for the image."""

RUBRICS = """{context_block}Below are example rubrics. Each names one ability a good answer about an image needs, and says what a response at each score from 1 (worst) to 5 (best) looks like.

{seed_block}

Write {n} new rubrics that are specific to THIS image: each must judge an ability that questions about this particular image would test (name the objects, text, regions or relations in it that matter), taking one of the example rubrics as its starting point. Each score description must say concretely what a response at that level gets right and wrong; the five levels must be clearly distinct and ordered.

Reply with JSON of this form:
{{"rubrics": [{{"seed": "<name of the example rubric it builds on>", "criteria": "<one question the judge asks about a response>", "score1_description": "...", "score2_description": "...", "score3_description": "...", "score4_description": "...", "score5_description": "..."}}]}}"""

SEED_ITEM = "Example rubric '{name}' ({category}):\n{text}"

PARAPHRASE = """Here is a rubric for grading answers about the image:

{rubric}

Reword it: keep exactly what it asks and what each score level means, but use different wording and sentence structure. Do not add or drop requirements.

Reply with JSON of this form:
{{"criteria": "...", "score1_description": "...", "score2_description": "...", "score3_description": "...", "score4_description": "...", "score5_description": "..."}}"""

INSTRUCTIONS = """{context_block}Rubric used to grade answers:
{rubric}

Write {n} different requests a person might make about this image whose answers this rubric would grade well. Each request must need the image to answer (not general knowledge), and must be answerable from the image. For each, write a reference answer that would earn a score of 5 under the rubric: correct, complete and grounded in what the image shows.

Reply with JSON of this form:
{{"instructions": [{{"instruction": "...", "reference_answer": "..."}}]}}"""

RESPONSES = """{context_block}Request about the image:
{instruction}

Reference answer (earns a score of 5):
{reference_answer}

Rubric:
{rubric}

Write one response to the request for each of these scores: {scores}. Each response must earn exactly its score under the rubric, so the quality differences come from what the response gets right or wrong about the image, not from its style. Keep the responses similar in length{length_note}. For each response also write feedback: two to four sentences that explain, with reference to the rubric and to the image, why the response earns its score. Do not state the score itself in the feedback.

Reply with JSON of this form:
{{"responses": [{{"score": 1, "response": "...", "feedback": "..."}}]}}"""

LENGTH_NOTE = ": each about {words} words (an earlier try varied too much in length)"

NOISY = """Request about the image:
{instruction}

Write a new request about the same image that looks close to this one (similar topic and wording) but asks for something different, so that a perfect answer to the new request would be a poor answer to the original one.

Reply with JSON of this form:
{{"instruction": "..."}}"""

ANSWER = """{context_block}Request about the image:
{instruction}

Answer the request as well as you can, using what the image shows.

Reply with JSON of this form:
{{"answer": "..."}}"""
