"""In-process vLLM backend (optional extra: `pip install 'vlm-judge[vllm]'`, needs a GPU).

vLLM brings continuous batching, paged attention and automatic prefix caching (the shared image
+ rubric prefix of a group is computed once without any help from us). Prompts are laid out by
`vlm_judge.chat` with the model's own chat template, exactly as the hf backend lays them out, and
images go in as PIL images in `multi_modal_data`.

Not tested in this repository's CI (no GPU, no vllm wheel); the openai backend pointed at
`vllm serve` is the tested route to vLLM (docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm_judge import chat
from vlm_judge.backends.base import Generation, GenerationParams, Prompt
from vlm_judge.images import load_image


class VLLMBackend:
    """`model`: a model folder or name vLLM can load; keyword arguments go to `vllm.LLM`
    (e.g. tensor_parallel_size=2, max_model_len=4096, gpu_memory_utilization=0.9).
    `sampling_extra`: more `vllm.SamplingParams` fields for every request (e.g. a benchmark's
    {"min_tokens": 100, "ignore_eos": true})."""

    def __init__(self, model: str, enable_prefix_caching: bool = True, max_images_per_prompt: int = 4,
                 sampling_extra: dict[str, Any] | None = None, **kw: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"the vllm backend needs vLLM: pip install 'vlm-judge[vllm]' ({e})") from e
        from transformers import AutoConfig, AutoProcessor, AutoTokenizer

        self.name = str(model)
        self.sampling_extra = dict(sampling_extra or {})
        # SchedulesItself: the engine batches continuously, so it gets every pending prompt at once;
        # LLM.generate is not reentrant, so one call at a time
        self.max_in_flight, self.concurrent_calls = int(kw.get("max_num_seqs", 256)), 1
        cfg = AutoConfig.from_pretrained(model)
        self.vision = getattr(cfg, "vision_config", None) is not None
        self.templater = AutoProcessor.from_pretrained(model) if self.vision else AutoTokenizer.from_pretrained(model)
        extra = {"limit_mm_per_prompt": {"image": max_images_per_prompt}} if self.vision else {}
        self.llm = LLM(model=model, enable_prefix_caching=enable_prefix_caching, **extra, **kw)

    def _text(self, p: Prompt) -> str:
        if p.images and not self.vision:
            raise ValueError(f"{self.name} is a text judge and cannot see images")
        return chat.apply(self.templater, p, vision=self.vision)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One Generation per prompt; a prompt whose image cannot be read carries its error."""
        from vllm import SamplingParams

        out: list[Generation | None] = [None] * len(prompts)
        inputs, where = [], []
        for i, p in enumerate(prompts):
            try:
                item: dict[str, Any] = {"prompt": self._text(p)}
                if p.images:
                    item["multi_modal_data"] = {"image": [load_image(r) for r in p.images]}
            except Exception as e:  # noqa: BLE001 - one bad prompt must not stop the others
                out[i] = Generation(text=None, error=f"{type(e).__name__}: {e}")
                continue
            inputs.append(item)
            where.append(i)
        sp = SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            seed=params.seed if params.temperature > 0 else None, stop=list(params.stop) or None,
            **self.sampling_extra,
        )
        if inputs:
            for i, res in zip(where, self.llm.generate(inputs, sp, use_tqdm=False)):
                o = res.outputs[0]
                out[i] = Generation(text=o.text, prompt_tokens=len(res.prompt_token_ids or []),
                                    completion_tokens=len(o.token_ids))
        return [g or Generation(text=None, error="not generated") for g in out]
