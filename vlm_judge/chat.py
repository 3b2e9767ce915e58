"""The chat layout: how a rendered `Prompt` becomes the text a chat model reads.

One layout for scoring (the hf and vllm backends) and for training (train.encode), so a judge is
trained on exactly the prompts it is scored with:
- the template's system text, when there is one, is a system turn;
- the user turn holds the images first, then the text (LLaVA places `<image>` before the text);
  vision models take content as typed parts, text models as a plain string;
- the text ends at the model's generation prompt, followed by `Prompt.assistant_prefix`;
- a model without a chat template (a base LM) reads plain text: system, blank line, user, blank line.

Also here: the one fix for LLaVA processors whose image-token settings were left unset.
"""

from __future__ import annotations

from typing import Any

from vlm_judge.backends.base import Prompt


def is_vision(owner: Any) -> bool:
    """Whether `owner` is a multimodal processor (it wraps a tokenizer) rather than a tokenizer."""
    return getattr(owner, "tokenizer", None) is not None


def messages(prompt: Prompt, vision: bool, use_system: bool = True) -> list[dict[str, Any]]:
    """The chat turns for a rendered prompt (system turn, then the user turn with images first)."""
    msgs: list[dict[str, Any]] = []
    if use_system and prompt.system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": prompt.system}] if vision else prompt.system})
    if vision:
        content = [{"type": "image"} for _ in prompt.images] + [{"type": "text", "text": prompt.user}]
        msgs.append({"role": "user", "content": content})
    else:
        if prompt.images:
            raise ValueError("a text model cannot see images (use a vision judge or the caption bridge)")
        msgs.append({"role": "user", "content": prompt.user})
    return msgs


def assistant(text: str, vision: bool) -> dict[str, Any]:
    """An assistant turn (a training target) in the same content shape as the user turn."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}] if vision else text}


def templater(owner: Any) -> Any | None:
    """What renders the chat template: the processor when it has one, else its tokenizer; None
    when neither has a template."""
    for cand in (owner, getattr(owner, "tokenizer", None)):
        if cand is not None and getattr(cand, "chat_template", None):
            return cand
    return None


def render_chat(owner: Any, msgs: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """`msgs` through the owner's chat template (untokenized)."""
    t = templater(owner)
    if t is None:
        raise ValueError("the tokenizer has no chat template")
    return t.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)


def apply(owner: Any, prompt: Prompt, vision: bool | None = None, use_system: bool = True) -> str:
    """The prompt as the model reads it, ending where the answer starts (generation prompt +
    `assistant_prefix`). `owner`: a processor (vision) or a tokenizer (text)."""
    vision = is_vision(owner) if vision is None else vision
    if templater(owner) is None:
        if prompt.images:
            raise ValueError("a model without a chat template cannot place images")
        # a base model without a template reads plain text
        system = prompt.system + "\n\n" if use_system and prompt.system else ""
        return system + prompt.user + "\n\n" + prompt.assistant_prefix
    return render_chat(owner, messages(prompt, vision, use_system), True) + prompt.assistant_prefix


def fix_llava_processor(processor: Any, config: Any) -> Any:
    """Fill a LLaVA processor's image-token settings that checkpoints converted for llava-1.5 may
    leave unset (transformers 5.x); without them an image does not expand to as many tokens as the
    vision tower gives features ("Image features and image tokens do not match").

    `patch_size` and `vision_feature_select_strategy` come from the model config. The CLS token a
    CLIP tower prepends is counted (`num_additional_image_tokens = 1`) only for a CLIP tower: other
    towers (SigLIP) have none, and their 0 is right. A value already set is kept. Processors that
    are not LLaVA-style (no `patch_size` attribute) and text models are returned unchanged."""
    vc = getattr(config, "vision_config", None)
    if vc is None or not hasattr(processor, "patch_size"):
        return processor
    if processor.patch_size is None:
        processor.patch_size = vc.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = getattr(config, "vision_feature_select_strategy", None) or "default"
    # LlavaProcessor defaults the count to 0, so 0 means "not set" as much as None does
    if not getattr(processor, "num_additional_image_tokens", 0) and getattr(vc, "model_type", "") == "clip_vision_model":
        processor.num_additional_image_tokens = 1
    return processor


__all__ = ["apply", "assistant", "fix_llava_processor", "is_vision", "messages", "render_chat", "templater"]
