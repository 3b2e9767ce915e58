"""Tiny, randomly initialised judge models built offline in seconds, for tests and benchmarks.

`build_tiny_llava` makes a real LlavaForConditionalGeneration (CLIP vision tower + Llama language
model) with a real byte-level BPE tokenizer and a LlavaProcessor, saved as a normal folder that
`from_pretrained` loads. `build_tiny_text_lm` makes a LlamaForCausalLM with the same tokenizer.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS, EOS = "<s>", "</s>"

# A LLaVA-1.5-like chat template: "USER: <image>\n... ASSISTANT: ..."; `{{ '\n' }}` because
# templates render with trim_blocks (a typed newline after a block tag would vanish).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ '\n' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{{ message['content'][0]['text'] }}{% endif %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "Feedback: The response is accurate and grounded in the image. So the overall score is 5.\n[RESULT] 5",
    "Feedback: The response misses the main object. So the overall score is 2.\n[RESULT] 2",
    "###Task Description: ###The instruction to evaluate: ###Response to evaluate: ###Score Rubrics:",
    "###Reference Answer (Score 5): ###Feedback: Score 1: Score 2: Score 3: Score 4: Score 5:",
    "What color is the shape? It is red. It is blue. The circle is green. How many objects are there?",
    "So the better response is A. [RESULT] A [RESULT] B Response A Response B USER: ASSISTANT:",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}'\"-_/\\#\n",
]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (every string encodes) with <image>, <pad>, <s>, </s> specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS, EOS, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _llama_config(tokenizer, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava(out_dir: str | Path, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """Save a tiny LLaVA judge (model + LlavaProcessor) to `out_dir` and return the path.

    With the defaults an image becomes (32/8)^2 = 16 image tokens ('default' feature selection
    drops the CLS token, so num_additional_image_tokens=1).
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=_llama_config(tok), image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    cfg.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_text_lm(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny Llama causal LM text judge (model + tokenizer with a chat template)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = LlamaForCausalLM(_llama_config(tok)).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
