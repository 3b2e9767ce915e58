"""Examples -> token ids and labels, with the loss on the target only.

The prompt is rendered by `vlm_judge.prompts.render` and laid out by `vlm_judge.chat` exactly as a
judge is prompted at scoring time (chat template, then the generation prompt).
The whole conversation (prompt + target) is tokenized once, so the target's tokens are the ones
the model would produce after the generation prompt; the prompt's tokens (image tokens included),
and later the padding, get label -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from train.data import Example, RowError
from vlm_judge import chat
from vlm_judge.backends.base import Prompt
from vlm_judge.images import load_image
from vlm_judge.prompts import render

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    extra: dict[str, Any]
    """Processor outputs besides the ids (pixel_values, image_sizes, ...), as tensors."""


class Encoder:
    """Encodes examples for one model (vision: a processor; text: a tokenizer)."""

    def __init__(self, processor: Any, kind: str, template: str = "default", use_system: bool = True,
                 max_length: int = 2048, image_token_id: int | None = None) -> None:
        self.processor = processor
        self.kind = kind
        self.template = template
        self.use_system = use_system
        self.max_length = max_length
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = image_token_id
        self._fixed_image_tokens: int | None = None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- text layout --------------------------------------------------------------------------

    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as the judge sees it at scoring time (`vlm_judge.chat`: chat template +
        generation prompt)."""
        return chat.apply(self.processor, prompt, vision=self.kind == "vision", use_system=self.use_system)

    def _add_special(self, text: str) -> bool:
        # a chat template that writes BOS itself must not get a second one from the tokenizer
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    # -- encoding -----------------------------------------------------------------------------

    def _texts(self, ex: Example) -> tuple[Prompt, str, str, bool]:
        """(rendered prompt, prompt text, prompt + target text, whether the tokenizer adds specials)."""
        prompt = render(ex.request, self.template)
        vision = self.kind == "vision"
        prompt_text = self.prompt_text(prompt)
        msgs = chat.messages(prompt, vision, self.use_system) + [chat.assistant(ex.target, vision)]
        full_text = chat.render_chat(self.processor, msgs, False)
        if not full_text.startswith(prompt_text):
            # templates whose assistant turn does not extend the generation prompt: append by hand
            full_text = prompt_text + ex.target + (self.tokenizer.eos_token or "")
        return prompt, prompt_text, full_text, self._add_special(full_text)

    def _image_tokens(self, ref: Any) -> int | None:
        """How many tokens one image expands to (fixed per processor for LLaVA-1.5; measured once)."""
        if self._fixed_image_tokens is not None:
            return self._fixed_image_tokens
        if self.image_token_id is None:
            return None
        img_tok = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        ids = self.processor(text=img_tok, images=[load_image(ref)], add_special_tokens=False)["input_ids"][0]
        n = list(ids).count(self.image_token_id)
        if type(self.processor).__name__ == "LlavaProcessor":  # fixed resolution: same count for every image
            self._fixed_image_tokens = n
        return n

    def length(self, ex: Example) -> int:
        """Sequence length of the encoded example without preprocessing its pixels (cheap check for
        over-length rows before training); equals len(encode(ex).input_ids)."""
        prompt, _, full_text, add_special = self._texts(ex)
        n = len(self.tokenizer(full_text, add_special_tokens=add_special)["input_ids"])
        if self.kind == "vision" and prompt.images:
            per = self._image_tokens(prompt.images[0])
            if per is None:
                return len(self.encode(ex).input_ids)
            n += len(prompt.images) * (per - 1)
        return n

    def encode(self, ex: Example) -> Encoded:
        """Ids and labels for one example; RowError for over-length rows or unreadable images."""
        prompt, prompt_text, full_text, add_special = self._texts(ex)
        vision = self.kind == "vision"
        # how many tokens the target takes: tokenize the unexpanded text once with offsets
        enc = self.tokenizer(full_text, add_special_tokens=add_special, return_offsets_mapping=True)
        n_prompt = sum(1 for (s, e) in enc["offset_mapping"] if e <= len(prompt_text) and not (s == e and s > 0))
        n_target = len(enc["input_ids"]) - n_prompt
        if n_target <= 0:
            raise RowError("empty target: no target tokens after the prompt")
        extra: dict[str, Any] = {}
        if vision and prompt.images:
            try:
                images = [load_image(im) for im in prompt.images]
            except Exception as e:  # noqa: BLE001 - any decode failure is a bad row
                raise RowError(f"unreadable image: {e}") from e
            out = self.processor(text=full_text, images=images, return_tensors="pt", add_special_tokens=add_special)
            ids = out["input_ids"][0].tolist()
            extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        else:
            ids = list(enc["input_ids"])
        if len(ids) > self.max_length:
            raise RowError(f"over-length: {len(ids)} tokens > max_length {self.max_length}")
        labels = [IGNORE] * (len(ids) - n_target) + ids[-n_target:]
        if self.image_token_id is not None:
            labels = [IGNORE if t == self.image_token_id else lab for t, lab in zip(ids, labels)]
        return Encoded(ids, labels, extra)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad ids (pad_id), attention mask (0) and labels (-100); concatenate image tensors."""
    import torch

    n = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b.input_ids)
        ids[i, :k] = torch.tensor(b.input_ids)
        labels[i, :k] = torch.tensor(b.labels)
        mask[i, :k] = 1
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    keys = {k for b in batch for k in b.extra}
    for k in keys:
        parts = [b.extra[k] for b in batch if k in b.extra]
        out[k] = torch.cat(parts, dim=0)
    return out
