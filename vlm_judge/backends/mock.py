"""A deterministic backend for unit tests of the scorer logic (never for end-to-end claims).

Its verdict is a hash of the prompt text, so it is reproducible and, on purpose, blind to images:
the eval grounding probe uses it as the judge that ignores the image. It never decodes pixels
(scoring thousands of rows with huge images costs no image memory), and it cuts its answer at
`max_new_tokens` words with finish_reason "length", as a real model would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from vlm_judge.backends.base import Generation, GenerationParams, Prompt


class MockBackend:
    """Answers from a hash of the prompt, or from `script` (a function of prompt and call count)."""

    def __init__(
        self,
        model: str = "mock",
        script: Callable[[Prompt, int], str] | None = None,
        **_: object,
    ) -> None:
        self.name = model
        self.script = script
        self.calls: list[Prompt] = []

    def _default(self, prompt: Prompt, params: GenerationParams) -> str:
        h = int(hashlib.sha256((prompt.user + str(params.seed if params.temperature > 0 else "")).encode()).hexdigest(), 16)
        if "Response B" in prompt.user:
            return f"Feedback: Compared against the rubric, one response fits better. [RESULT] {'AB'[h % 2]}"
        return f"Feedback: The response is judged against the rubric. So the overall score is {h % 5 + 1}.\n[RESULT] {h % 5 + 1}"

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        out = []
        for p in prompts:
            self.calls.append(p)
            try:
                text = self.script(p, len(self.calls)) if self.script else self._default(p, params)
            except Exception as e:  # a scripted failure stands for a backend error on this prompt
                out.append(Generation(text=None, error=f"{type(e).__name__}: {e}"))
                continue
            words = text.split(" ")
            cut = len(words) > params.max_new_tokens  # a word stands for a token: honour max_new_tokens
            if cut:
                text = " ".join(words[: params.max_new_tokens])
            out.append(Generation(text=text, prompt_tokens=len(p.user.split()), completion_tokens=len(text.split()),
                                  extra={"finish_reason": "length" if cut else "stop"}))
        return out
