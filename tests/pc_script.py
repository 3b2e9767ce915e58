"""A scripted teacher "model" for the data builder's tests: a vlm_judge Backend that answers each
stage's prompt with valid JSON derived deterministically from the prompt (and the image bytes),
served by the real `vlm_judge.serve.start_server` in end-to-end tests.

Words in an image's context (its folder metadata) switch on the failure paths:
  DUPLICATE  -> its rubrics share one criteria text (one is dropped as a near-duplicate)
  MALFORMED  -> the rubric answer is prose, not JSON (the image is dropped with the parse reason)
  LONGWINDED -> the first try at responses varies wildly in length; a try with a length hint fits
  RAMBLE     -> responses never fit the length ratio (the instruction is dropped with the ratio)
(FAULT500 is handled by the server's fault function in the tests, not here.)
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Sequence

from vlm_judge.backends.base import Generation, GenerationParams, Prompt


def stage_of(text: str) -> str:
    """Which builder stage a teacher prompt belongs to (from the JSON form it asks for)."""
    for key, stage in (('{"rubrics":', "rubrics"), ('{"instructions":', "instructions"), ('{"responses":', "responses"),
                       ('{"answer":', "answer"), ('{"instruction": "..."}', "noisy"), ("Reword it", "paraphrase")):
        if key in text:
            return stage
    return "unknown"


_COUNT = {1: 'none', 2: 'one', 3: 'two', 4: 'three', 5: 'all'}


def _words(n: int, salt: str) -> str:
    vocab = ["red", "round", "left", "bright", "small", "near", "metal", "soft", "tall", "flat", "dark", "wide"]
    h = int(hashlib.sha1(salt.encode()).hexdigest(), 16)
    return " ".join(vocab[(h >> (i % 60)) % len(vocab)] for i in range(n))


def _rubric(criteria: str, tag: str) -> dict:
    d = {"criteria": criteria}
    for s in range(1, 6):
        d[f"score{s}_description"] = f"Level {s} for {tag}: the answer gets {s} of five checks right."
    return d


class ScriptedVLM:
    """Backend: deterministic JSON per stage; counts calls per stage (thread-safe)."""

    def __init__(self, name: str = "scripted-vlm") -> None:
        self.name = name
        self.calls: Counter = Counter()
        self._lock = threading.Lock()

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        out = []
        for p in prompts:
            text = self.answer(p)
            out.append(Generation(text=text, prompt_tokens=len(p.user.split()), completion_tokens=len(text.split())))
        return out

    def answer(self, p: Prompt) -> str:
        u = p.user
        stage = stage_of(u)
        with self._lock:
            self.calls[stage] += 1
        fp = hashlib.sha1(b"".join(im.data or b"" for im in p.images)).hexdigest()[:6]  # which image
        if stage == "rubrics":
            if "MALFORMED" in u:
                return "I looked at the picture and I think it is lovely, but I will not write JSON today."
            n = int(re.search(r"Write (\d+) new rubrics", u).group(1))
            seeds = re.findall(r"Example rubric '([^']+)'", u)
            dup = "DUPLICATE" in u
            items = []
            for k in range(n):
                crit = (f"Does the response describe picture {fp} correctly?" if dup
                        else f"Does the response get aspect {k} of picture {fp} right ({seeds[k % len(seeds)]})?")
                items.append({"seed": seeds[k % len(seeds)], **_rubric(crit, f"{fp}-{k}")})
            # prose and a code fence around the JSON: the parser must cope
            return "Here are the rubrics.\n```json\n" + json.dumps({"rubrics": items}) + "\n```\nHope this helps."
        if stage == "paraphrase":
            crit = re.search(r"\[(.+?)\]", u).group(1)
            return json.dumps(_rubric("In other words: " + crit, "reworded"))
        if stage == "instructions":
            n = int(re.search(r"Write (\d+) different requests", u).group(1))
            crit = re.search(r"\[(.+?)\]", u).group(1)
            h = hashlib.sha1(crit.encode()).hexdigest()[:4]
            return json.dumps({"instructions": [
                {"instruction": f"Question {k} ({h}) about picture {fp}: what do you see?",
                 "reference_answer": f"A full answer {k} about picture {fp}: " + _words(12, crit + str(k))}
                for k in range(n)]})
        if stage == "responses":
            scores = [int(s) for s in re.search(r"for each of these scores: ([\d, ]+)\.", u).group(1).split(",")]
            hint = re.search(r"each about (\d+) words", u)
            q = re.search(r"Request about the image:\n(.+)", u).group(1)
            unbalanced = "RAMBLE" in u or ("LONGWINDED" in u and not hint)
            items = []
            for s in scores:
                n = (4 + 10 * s) if unbalanced else 10 + (s % 2)
                items.append({"score": s, "response": f"[{s}] " + _words(n, q + str(s)),
                              "feedback": f"The response gets {_COUNT[s]} of the rubric's checks right for this "
                                          f"picture, as the image shows. So the overall score is {s}"})
            return json.dumps({"responses": items})
        if stage == "noisy":
            q = re.search(r"Request about the image:\n(.+)", u).group(1)
            return json.dumps({"instruction": q.replace("what do you see", "what is missing")})
        if stage == "answer":
            q = re.search(r"Request about the image:\n(.+)", u).group(1)
            return json.dumps({"answer": "Answer to: " + q + " " + _words(8, q)})
        return "no idea"
