"""The one chat layout (vlm_judge.chat) and the one LLaVA processor fix, on real tiny models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vlm_judge.backends.base import Prompt  # noqa: E402
from vlm_judge.chat import apply, fix_llava_processor  # noqa: E402
from vlm_judge.images import resolve_image  # noqa: E402


def _image_tokens(proc, path) -> int:
    from PIL import Image

    ids = proc(text="<image>\nhi", images=[Image.open(path).convert("RGB")])["input_ids"][0]
    return list(ids).count(proc.tokenizer.convert_tokens_to_ids("<image>"))


def test_clip_tower_gets_its_cls_token_when_the_count_was_left_at_the_default_0(tiny_llava_dir, sample_images):
    """A converted llava-1.5 processor may carry no count at all: LlavaProcessor then defaults it to
    0, which is as unset as None, and the image must still expand to the tower's feature count."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir))
    proc = AutoProcessor.from_pretrained(str(tiny_llava_dir))
    proc.patch_size = proc.vision_feature_select_strategy = None
    proc.num_additional_image_tokens = 0
    fix_llava_processor(proc, model.config)
    assert (proc.patch_size, proc.vision_feature_select_strategy, proc.num_additional_image_tokens) == (8, "default", 1)
    img = Image.open(sample_images["rocket"]).convert("RGB")
    enc = proc(text="<image>\nhi", images=[img], return_tensors="pt")
    with torch.no_grad():
        model(**enc)  # "Image features and image tokens do not match" if the count were wrong
    assert _image_tokens(proc, sample_images["rocket"]) == 16


def test_a_tower_without_cls_gets_no_extra_token(tiny_llava_dir, sample_images):
    """SigLIP prepends no CLS token: its count stays 0 and the image still matches the tower."""
    from PIL import Image
    from transformers import (
        AutoProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    clip = LlavaConfig.from_pretrained(str(tiny_llava_dir))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=clip.text_config, image_token_id=clip.image_token_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = AutoProcessor.from_pretrained(str(tiny_llava_dir))
    proc.patch_size = proc.vision_feature_select_strategy = None
    proc.num_additional_image_tokens = 0
    fix_llava_processor(proc, cfg)
    assert (proc.patch_size, proc.vision_feature_select_strategy, proc.num_additional_image_tokens) == (8, "default", 0)
    img = Image.open(sample_images["rocket"]).convert("RGB")
    with torch.no_grad():
        model(**proc(text="<image>\nhi", images=[img], return_tensors="pt"))
    assert _image_tokens(proc, sample_images["rocket"]) == 15  # 16 patches, 'default' drops the first


def test_fix_keeps_settings_already_there_and_leaves_text_models_alone(tiny_llava_dir, tiny_text_lm_dir):
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    proc = AutoProcessor.from_pretrained(str(tiny_llava_dir))
    proc.patch_size, proc.vision_feature_select_strategy = 4, "full"
    fix_llava_processor(proc, AutoConfig.from_pretrained(str(tiny_llava_dir)))
    assert (proc.patch_size, proc.vision_feature_select_strategy, proc.num_additional_image_tokens) == (4, "full", 1)
    tok = AutoTokenizer.from_pretrained(str(tiny_text_lm_dir))
    assert fix_llava_processor(tok, AutoConfig.from_pretrained(str(tiny_text_lm_dir))) is tok
    assert not hasattr(tok, "patch_size")


def test_layouts_vision_text_and_no_template(tiny_llava_dir, tiny_text_lm_dir, sample_images):
    from transformers import AutoProcessor, AutoTokenizer

    img = resolve_image(str(sample_images["chelsea"]))
    p = Prompt(user="Grade this.", system="You are a fair judge.", images=(img, img), assistant_prefix="Feedback:")
    vision = apply(AutoProcessor.from_pretrained(str(tiny_llava_dir)), p)
    assert vision == "You are a fair judge.\nUSER: <image>\n<image>\nGrade this. ASSISTANT:Feedback:"

    tok = AutoTokenizer.from_pretrained(str(tiny_text_lm_dir))
    text = apply(tok, Prompt(user="Grade this.", system="You are a fair judge.", assistant_prefix="Feedback:"))
    assert text == "You are a fair judge.\nUSER: Grade this. ASSISTANT:Feedback:"
    assert apply(tok, Prompt(user="Grade this."), use_system=False) == "USER: Grade this. ASSISTANT:"
    with pytest.raises(ValueError, match="cannot see images"):
        apply(tok, p)

    tok.chat_template = None  # a base LM: plain text, ending where the answer starts
    assert apply(tok, Prompt(user="Grade this.", system="Be fair.", assistant_prefix="F:")) == "Be fair.\n\nGrade this.\n\nF:"


def test_training_and_scoring_lay_out_the_same_prompt(tiny_llava_dir, sample_images):
    """The text a judge is trained on ends exactly where the scorer's decoder starts."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from train.data import Example
    from train.encode import Encoder
    from vlm_judge.backends.hf import HFBackend
    from vlm_judge.prompts import render
    from vlm_judge.records import JudgeRequest, Rubric

    proc = AutoProcessor.from_pretrained(str(tiny_llava_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir))
    rubric = Rubric.from_dict({"criteria": "Names the animal?", **{f"score{i}_description": f"level {i}" for i in range(1, 6)}})
    req = JudgeRequest("What animal?", "A cat.", rubric, images=(resolve_image(str(sample_images["chelsea"])),))
    enc = Encoder(proc, "vision")
    scored = HFBackend.from_model(model, proc)._chat_text(render(req))
    assert enc.prompt_text(render(req)) == scored
    ex = Example(request=req, target="Feedback: good. So the overall score is 5\n[RESULT] 5", verdict=5, source="t")
    _, prompt_text, full_text, _ = enc._texts(ex)
    assert prompt_text == scored and full_text.startswith(scored + " Feedback: good.")
