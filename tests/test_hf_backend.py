"""The transformers backend on tiny real models (LLaVA and a Llama text LM) and real photos."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")

from vlm_judge.backends import get_backend  # noqa: E402
from vlm_judge.backends.base import GenerationParams, Prompt  # noqa: E402
from vlm_judge.records import ImageRef, Rubric  # noqa: E402
from vlm_judge.scorer import Judge, ScorerConfig  # noqa: E402

RUBRIC = Rubric(
    criteria="Does the answer describe the photo correctly?",
    score_descriptions=("wrong", "mostly wrong", "partly right", "mostly right", "fully right"),
)
GREEDY = GenerationParams(max_new_tokens=12)


def _img(path) -> tuple[ImageRef, ...]:
    return (ImageRef(path=str(path)),)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    # EOS suppressed for a few tokens so the random model writes something to compare
    return get_backend("hf", model=str(tiny_llava_dir), min_new_tokens=8)


@pytest.fixture(scope="module")
def text_lm(tiny_text_lm_dir):
    return get_backend("hf", model=str(tiny_text_lm_dir), min_new_tokens=8)


def test_loads_the_right_model_kind(llava, text_lm):
    assert (llava.kind, text_lm.kind) == ("vision", "text")
    assert llava.model.dtype.is_floating_point and str(llava.device) == "cpu"


def test_vision_judge_scores_images_and_reports_parse_failures_honestly(tiny_llava_dir, sample_images):
    """End to end through Judge.load: a random model writes no verdict, and the row says so."""
    cfg = ScorerConfig(max_parse_retries=1, params=GenerationParams(max_new_tokens=10))
    judge = Judge.load(str(tiny_llava_dir), backend="hf", config=cfg)
    out = judge.absolute_grade(
        instructions=["What animal is this?", "What is the person wearing?"],
        responses=["A cat.", "A space suit."], rubric=RUBRIC,
        images=[[str(sample_images["chelsea"])], [str(sample_images["astronaut"])]],  # one list per row
    )
    for j in out:
        assert j.score is None and j.status == "parse_failure" and j.reason
        assert j.attempts == 2 and j.raw_output is not None  # one retry, counted


def test_changing_the_image_changes_what_the_judge_sees(llava, sample_images):
    prompts = [Prompt(user="Describe the image.", images=_img(sample_images[n])) for n in ("astronaut", "chelsea")]
    probs = llava.next_token_probs(prompts, ["It shows"] * 2, list("abcde"))
    diffs = [abs(probs[0][c] - probs[1][c]) for c in "abcde"]
    assert max(diffs) > 1e-4, diffs  # the pixels reach the language model
    gens = llava.generate(prompts + [Prompt(user="Describe the image.")], GenerationParams(max_new_tokens=24))
    assert gens[0].text != gens[1].text
    assert gens[0].prompt_tokens >= gens[2].prompt_tokens + 16  # 16 image tokens per 32x32 image


@pytest.mark.parametrize("which", ["llava", "text_lm"])
def test_batched_equals_one_at_a_time(which, request, sample_images):
    be = request.getfixturevalue(which)
    names = ["astronaut", "chelsea", "astronaut", "coffee", "rocket"]
    prompts = [
        Prompt(user=f"Question {i}: what is shown? Answer: {'x' * i}", system="Be strict." if i % 2 else None,
               images=_img(sample_images[n]) if which == "llava" else ())
        for i, n in enumerate(names)
    ]
    batched = be.generate(prompts, GREEDY)
    single = [be.generate([p], GREEDY)[0] for p in prompts]
    assert [g.error for g in batched] == [None] * 5
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.completion_tokens >= 8 for g in batched)


def test_a_corrupt_image_fails_only_its_row(tiny_llava_dir, sample_images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    judge = Judge.load(str(tiny_llava_dir), backend="hf",
                       config=ScorerConfig(max_parse_retries=0, params=GenerationParams(max_new_tokens=4)))
    out = judge.absolute_grade(
        instructions=["What is this?"] * 3, responses=["A cat."] * 3, rubric=RUBRIC,
        images=[[str(sample_images["chelsea"])], [str(bad)], [str(sample_images["coffee"])]],
    )
    assert [j.status for j in out] == ["parse_failure", "error", "parse_failure"]
    assert "cannot decode image" in out[1].reason and "broken.png" in out[1].reason


def test_a_text_judge_refuses_images_per_row(text_lm, sample_images):
    gens = text_lm.generate([Prompt(user="a", images=_img(sample_images["coffee"])), Prompt(user="b")], GREEDY)
    assert gens[0].text is None and "cannot see images" in gens[0].error
    assert gens[1].error is None and gens[1].text is not None


def test_save_and_reload_round_trip(llava, sample_images, tmp_path):
    out = tmp_path / "judge"
    llava.model.save_pretrained(out)
    llava.processor.save_pretrained(out)
    (out / "vlm_judge.json").write_text(json.dumps({"backend": "hf", "template": "prefix", "kind": "vision"}))
    judge = Judge.load(str(out), min_new_tokens=8)
    assert judge.config.template == "prefix"
    prompts = [Prompt(user="What is it?", images=_img(sample_images["rocket"]))]
    assert judge.backend.generate(prompts, GREEDY)[0].text == llava.generate(prompts, GREEDY)[0].text


def test_lora_adapter_folder_loads_base_and_adapter(tiny_llava_dir, llava, sample_images, tmp_path):
    """A judge folder holding only a LoRA adapter: the base comes from the card, the adapter is applied."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    peft_model = get_peft_model(base, cfg).eval()
    folder = tmp_path / "lora_judge"
    peft_model.save_pretrained(folder)
    (folder / "vlm_judge.json").write_text(json.dumps({"backend": "hf", "base_model": str(tiny_llava_dir)}))
    judge = Judge.load(str(folder), min_new_tokens=8)

    prompts = [Prompt(user="What is it?", images=_img(sample_images["chelsea"]))]
    p_probs = judge.backend.next_token_probs(prompts, ["It is"], list("abc"))[0]
    b_probs = llava.next_token_probs(prompts, ["It is"], list("abc"))[0]
    assert any(abs(p_probs[c] - b_probs[c]) > 1e-5 for c in "abc")  # the adapter changed the model
    # and the merged adapter computes what the peft model computes
    with torch.no_grad():
        enc_ids, pixels, _ = judge.backend._encode(prompts[0], judge.backend._chat_text(prompts[0]) + "It is")
        ids = torch.tensor([enc_ids])
        ref = peft_model(input_ids=ids, pixel_values=pixels[0]["pixel_values"]).logits[0, -1].softmax(-1)
    tok = judge.backend.tokenizer
    for c in "abc":
        full, _, _ = judge.backend._encode(prompts[0], judge.backend._chat_text(prompts[0]) + "It is" + c)
        assert abs(float(ref[full[len(enc_ids)]]) - p_probs[c]) < 1e-4, tok.decode(full[len(enc_ids):])


def test_llava_processor_with_unset_fields_is_fixed_from_the_config(tiny_llava_dir, llava, sample_images, tmp_path):
    """llava-1.5 conversions may ship a processor without patch_size etc. (transformers 5.x)."""
    folder = tmp_path / "unset"
    shutil.copytree(tiny_llava_dir, folder)
    pc = folder / "processor_config.json"
    cfg = json.loads(pc.read_text())
    for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        cfg.pop(k, None)
    pc.write_text(json.dumps(cfg))
    be = get_backend("hf", model=str(folder), min_new_tokens=8)
    prompts = [Prompt(user="What is it?", images=_img(sample_images["astronaut"]))]
    [g] = be.generate(prompts, GREEDY)
    assert g.error is None and g.text == llava.generate(prompts, GREEDY)[0].text


def test_sampling_is_seeded_and_stop_strings_cut(text_lm):
    p = [Prompt(user="Write anything.")]
    a = text_lm.generate(p, GenerationParams(max_new_tokens=16, temperature=1.0, seed=3))[0].text
    b = text_lm.generate(p, GenerationParams(max_new_tokens=16, temperature=1.0, seed=3))[0].text
    c = text_lm.generate(p, GenerationParams(max_new_tokens=16, temperature=1.0, seed=4))[0].text
    assert a == b and a != c
    full = text_lm.generate(p, GenerationParams(max_new_tokens=16))[0].text
    stop = full[3:5]
    cut = text_lm.generate(p, GenerationParams(max_new_tokens=16, stop=(stop,)))[0].text
    assert cut == full[: full.index(stop)]


def test_over_long_prompt_fails_its_row_only(text_lm):
    gens = text_lm.generate([Prompt(user="word " * 5000), Prompt(user="short")], GREEDY)
    assert gens[0].text is None and "context" in gens[0].error
    assert gens[1].error is None


def test_from_model_wraps_a_model_in_memory(llava, sample_images):
    from vlm_judge.backends.hf import HFBackend

    be = HFBackend.from_model(llava.model, llava.processor, name="mem", min_new_tokens=8)
    prompts = [Prompt(user="What is it?", images=_img(sample_images["coffee"]))]
    assert be.generate(prompts, GREEDY)[0].text == llava.generate(prompts, GREEDY)[0].text
