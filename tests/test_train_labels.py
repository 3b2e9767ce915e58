"""Loss on the target only: labels checked token by token on a real example (tiny LLaVA + a real photo)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from train.data import Example, RowContext, RowError, load_examples  # noqa: E402
from train.debug_data import rows_for, write_jsonl  # noqa: E402
from train.encode import IGNORE, Encoder, collate  # noqa: E402
from train.model import load_base  # noqa: E402
from vlm_judge.parse import parse_output  # noqa: E402
from vlm_judge.prompts import render  # noqa: E402


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_base(str(tiny_llava_dir), "vision")


@pytest.fixture(scope="module")
def examples(sample_images, tmp_path_factory):
    absolute, pairs = rows_for({k: str(v) for k, v in sample_images.items()})
    d = tmp_path_factory.mktemp("labels")
    ctx = RowContext(allowed_image_dirs=[str(next(iter(sample_images.values())).parent)])
    ex, rep = load_examples([write_jsonl(absolute[:2] + pairs[:1], d / "rows.jsonl")], ctx)
    assert rep.examples == 3 and not rep.skipped
    return ex


def test_labels_cover_exactly_the_target_tokens(llava, examples):
    model, proc = llava
    image_id = model.config.image_token_id
    enc = Encoder(proc, "vision", image_token_id=image_id)
    ex: Example = examples[0]
    e = enc.encode(ex)
    tok = proc.tokenizer
    ids, labels = e.input_ids, e.labels
    assert len(ids) == len(labels)

    # the sequence = the prompt exactly as the scorer would send it, then the target tokens
    prompt_text = enc.prompt_text(render(ex.request, "default"))
    prompt_ids = proc(text=prompt_text, images=[__import__("PIL.Image").Image.open(ex.request.images[0].path).convert("RGB")],
                      return_tensors="pt")["input_ids"][0].tolist()
    n_prompt = len(prompt_ids)
    assert ids[:n_prompt] == prompt_ids

    # token by token: every prompt position (16 image tokens included) is -100, every target
    # position carries its own id
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if i < n_prompt:
            assert lab == IGNORE, f"prompt token {i} ({tok.decode([t])!r}) has a label"
        else:
            assert lab == t, f"target token {i} ({tok.decode([t])!r}) is not labelled with itself"
    assert ids.count(image_id) == 16  # the 32x32 image expanded to its 16 image tokens
    assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t == image_id)

    # the labelled tokens decode to the target plus the end-of-turn token, and the parser reads it
    target_text = tok.decode([t for t in labels if t != IGNORE])
    assert target_text.strip() == ex.target + tok.eos_token
    assert parse_output(target_text, "absolute").verdict == ex.verdict
    assert e.extra["pixel_values"].shape == (1, 3, 32, 32)


def test_collate_pads_right_with_no_loss_on_padding(llava, examples):
    model, proc = llava
    enc = Encoder(proc, "vision", image_token_id=model.config.image_token_id)
    encs = [enc.encode(ex) for ex in examples]
    batch = collate(encs, proc.tokenizer.pad_token_id)
    n = max(len(e.input_ids) for e in encs)
    assert batch["input_ids"].shape == (3, n)
    for row, e in enumerate(encs):
        k = len(e.input_ids)
        assert batch["attention_mask"][row, :k].all() and not batch["attention_mask"][row, k:].any()
        assert (batch["labels"][row, k:] == IGNORE).all()
        assert batch["labels"][row, :k].tolist() == e.labels
    assert batch["pixel_values"].shape[0] == 3  # one image per row, in row order
    # the model accepts the batch and its loss is over target tokens only
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_relative_example_targets_a_b_verdict(llava, examples):
    model, proc = llava
    enc = Encoder(proc, "vision", image_token_id=model.config.image_token_id)
    rel = next(ex for ex in examples if ex.request.mode == "relative")
    e = enc.encode(rel)
    text = proc.tokenizer.decode([t for t in e.labels if t != IGNORE])
    assert parse_output(text, "relative").verdict == rel.verdict == "B"


def test_over_length_row_is_a_row_error(llava, examples):
    model, proc = llava
    enc = Encoder(proc, "vision", max_length=64, image_token_id=model.config.image_token_id)
    with pytest.raises(RowError, match="over-length"):
        enc.encode(examples[0])


def test_text_judge_labels(tiny_text_lm_dir, tmp_path):
    from train.debug_data import rows_for

    _, tok = load_base(str(tiny_text_lm_dir), "text")
    absolute, _ = rows_for({"astronaut": "unused.png"})
    rows = [{k: v for k, v in r.items() if k != "image"} for r in absolute[:1]]  # Feedback-Collection row
    ex, _ = load_examples([write_jsonl(rows, tmp_path / "fc.jsonl")], RowContext(kind="text"))
    enc = Encoder(tok, "text")
    e = enc.encode(ex[0])
    prompt_ids = tok(enc.prompt_text(render(ex[0].request, "default")))["input_ids"]
    assert e.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE for lab in e.labels[: len(prompt_ids)])
    assert e.labels[len(prompt_ids):] == e.input_ids[len(prompt_ids):]
    assert tok.decode(e.labels[len(prompt_ids):]).strip() == ex[0].target + tok.eos_token


def test_processor_settings_filled_from_the_model_config(tiny_llava_dir, sample_images):
    """llava-1.5 processors may come with patch_size & co unset (transformers 5.x): fill them or
    the image does not expand to its image tokens."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from vlm_judge.chat import fix_llava_processor as fix_processor

    proc = AutoProcessor.from_pretrained(str(tiny_llava_dir))
    proc.patch_size = proc.vision_feature_select_strategy = proc.num_additional_image_tokens = None
    fix_processor(proc, AutoConfig.from_pretrained(str(tiny_llava_dir)))
    assert (proc.patch_size, proc.vision_feature_select_strategy, proc.num_additional_image_tokens) == (8, "default", 1)
    ids = proc(text="<image>\nhi", images=[Image.open(sample_images["rocket"]).convert("RGB")])["input_ids"][0]
    assert list(ids).count(proc.tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_cheap_length_matches_the_encoding(llava, examples, tiny_text_lm_dir):
    model, proc = llava
    enc = Encoder(proc, "vision", image_token_id=model.config.image_token_id)
    for ex in examples:
        assert enc.length(ex) == len(enc.encode(ex).input_ids)
