"""Load a base judge model and make the right parameters trainable.

Vision judges are LLaVA-family models (AutoModelForImageTextToText; the language model lives at
`model.model.language_model` in transformers 5.x). Text judges are causal LMs with a chat
template. LoRA targets the *language model's* linear layers by regex: peft's "all-linear" would
also adapt the vision tower (CLIP has q_proj/k_proj/v_proj too) and the projector.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from vlm_judge.chat import fix_llava_processor

log = logging.getLogger("vlm_judge.train")

TINY_BASES = ("tiny:llava", "tiny:text")


def resolve_base(base_model: str, cache_dir: str | Path) -> str:
    """A model folder or name; 'tiny:llava' / 'tiny:text' are built offline once into cache_dir."""
    if base_model not in TINY_BASES:
        return base_model
    from vlm_judge.tiny_models import build_tiny_llava, build_tiny_text_lm

    out = Path(cache_dir) / base_model.replace(":", "-")
    if not (out / "config.json").is_file():
        (build_tiny_llava if base_model == "tiny:llava" else build_tiny_text_lm)(out)
    return str(out)


def load_base(path: str, kind: str, dtype: Any = None, chat_template: str | None = None) -> tuple[Any, Any]:
    """(model, processor-or-tokenizer) for a vision or text judge base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    dtype = dtype or torch.float32
    if kind == "vision":
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        proc = fix_llava_processor(AutoProcessor.from_pretrained(path), model.config)
        tok = proc.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        proc = tok = AutoTokenizer.from_pretrained(path)
    if chat_template:
        text = Path(chat_template).read_text() if Path(chat_template).is_file() else chat_template
        tok.chat_template = text
        if proc is not tok:
            proc.chat_template = text
    if not (getattr(proc, "chat_template", None) or tok.chat_template):
        raise ValueError(f"{path}: the tokenizer has no chat template; set chat_template in the recipe")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # right padding + -100 labels make the choice harmless
    return model, proc


def language_model(model: Any) -> Any:
    """The decoder stack of a vision judge (or the text judge's own base model)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def lora_target_regex(model: Any, kind: str) -> str:
    """Regex (peft full-match on module names) for the language model's linear layers, lm_head excluded."""
    import torch

    lm = language_model(model)
    prefix = next((n for n, m in model.named_modules() if m is lm), "")
    leaves = sorted({n.split(".")[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)})
    if not leaves:
        raise ValueError("no linear layers found in the language model")
    names = "|".join(re.escape(x) for x in leaves)
    if kind == "vision" and prefix:
        return rf"{re.escape(prefix)}\..*\.({names})"
    return rf"(?!lm_head).*\.({names})" if prefix == "" else rf"{re.escape(prefix)}\..*\.({names})"


def projector_name(model: Any) -> str | None:
    """The projector's module name (for peft modules_to_save), or None for a text model."""
    for n, _ in model.named_modules():
        if n.endswith("multi_modal_projector"):
            return n.split(".")[-1]
    return None


def prepare_for_training(model: Any, cfg: Any) -> Any:
    """Apply LoRA or set up full fine-tuning; freeze the vision tower (and, when asked, the embeddings).
    Returns the model to train."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target or lora_target_regex(model, cfg.kind)
        save = None
        if cfg.train_projector:
            proj = projector_name(model)
            if proj is None:
                raise ValueError("train_projector=true but the model has no multi_modal_projector")
            save = [proj]
        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target,
            modules_to_save=save, task_type="CAUSAL_LM", bias="none",
        )
        model = get_peft_model(model, lcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.kind == "vision" and cfg.freeze_vision_tower:
            for n, p in model.named_parameters():
                if "vision_tower" in n:
                    p.requires_grad_(False)
        if cfg.kind == "vision" and not cfg.train_projector:
            for n, p in model.named_parameters():
                if "multi_modal_projector" in n:
                    p.requires_grad_(False)
        if cfg.freeze_embeddings:
            # token embeddings and LM head (tied or not) stay as they are: see TrainConfig.freeze_embeddings
            for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
                for p in mod.parameters() if mod is not None else ():
                    p.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(1, n_all))
    return model
