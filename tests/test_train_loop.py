"""End-to-end training on CPU: tiny real LLaVA, real photos, feedback-then-score targets."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from train.config import TrainConfig  # noqa: E402
from train.debug_data import rows_for, write_jsonl  # noqa: E402
from train.judge_folder import load_judge  # noqa: E402
from train.loop import train  # noqa: E402
from vlm_judge.card import load_card  # noqa: E402


@pytest.fixture(scope="module")
def data(sample_images, tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    absolute, pairs = rows_for({k: str(v) for k, v in sample_images.items()})
    train_rows = [r for r in absolute if not r["id"].startswith("rocket")] + pairs
    bad = [
        {"orig_instruction": "no response here", "orig_score": 3},  # missing fields
        {**absolute[0], "image": str(d / "missing.png")},  # unreadable image
    ]
    return {
        "train": str(write_jsonl(train_rows + bad, d / "rows.jsonl")),
        "heldout": str(write_jsonl([r for r in absolute if r["id"].startswith("rocket")], d / "heldout.jsonl")),
        "images": str(next(iter(sample_images.values())).parent),
        "dir": d,
    }


def _cfg(base, data, out, **kw) -> TrainConfig:
    args = dict(
        base_model=str(base), kind="vision", train_data=[data["train"]], allowed_image_dirs=[data["images"], str(data["dir"])],
        output_dir=str(out), per_device_batch_size=2, lr=3e-3, lr_schedule="constant", lora_r=8, lora_alpha=64,
        lora_dropout=0.0, precision="fp32", log_every=100, tensorboard=False, seed=0,
    )
    args.update(kw)
    return TrainConfig(**args)


@pytest.fixture(scope="module")
def lora_run(tiny_llava_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_judge")
    cfg = _cfg(tiny_llava_dir, data, out, max_steps=20, eval_data=[data["heldout"]], eval_every=20,
               eval_max_new_tokens=4, eval_max_rows=2, save_every=10)
    return cfg, train(cfg)


def _dataset_loss(model, proc, path) -> float:
    from train.data import RowContext, load_examples
    from train.encode import Encoder, collate

    exs, _ = load_examples([path], RowContext(allowed_image_dirs=["/"]))
    enc = Encoder(proc, "vision", image_token_id=model.config.image_token_id)
    batch = collate([enc.encode(e) for e in exs], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


def test_loss_falls(lora_run, tiny_llava_dir, data):
    from transformers import AutoModelForImageTextToText

    _, res = lora_run
    assert res.step == 20 and len(res.losses) == 20
    first, last = sum(res.losses[:4]) / 4, sum(res.losses[-4:]) / 4
    assert last < first, f"training loss did not fall: {first:.3f} -> {last:.3f}"
    # on the same fixed rows, before and after training
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir))
    before = _dataset_loss(base, res.processor, data["train"])
    after = _dataset_loss(res.model, res.processor, data["train"])
    assert after < before - 0.3, f"loss on the training rows did not fall: {before:.3f} -> {after:.3f}"


def test_bad_rows_are_skipped_with_reasons(lora_run):
    _, res = lora_run
    assert res.report.skipped["missing field"] == 1
    assert res.report.skipped["unreadable image"] == 1
    log = json.loads((res.output_dir / "train_log.json").read_text())
    assert log["skipped"] == {"missing field": 1, "unreadable image": 1}


def test_eval_runs_through_the_scorer(lora_run):
    _, res = lora_run
    assert res.evals and res.evals[-1]["step"] == 20
    assert 0.0 <= res.evals[-1]["eval/parse_rate"] <= 1.0 and res.evals[-1]["eval/n"] == 2


def test_judge_folder_contents(lora_run, tiny_llava_dir):
    cfg, res = lora_run
    out = res.output_dir
    card = load_card(out, required=True)
    assert card["backend"] == "hf" and card["kind"] == "vision" and card["adapter"] is True
    assert card["template"] == "default" and card["version"] and card["base_model"] == str(tiny_llava_dir.resolve())
    for f in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json", "recipe.yaml"):
        assert (out / f).is_file(), f
    assert TrainConfig.load(out / "recipe.yaml").lora_r == cfg.lora_r  # the resolved recipe reloads


def test_frozen_params_unchanged_and_lora_changed(lora_run, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    _, res = lora_run
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir)).state_dict()
    model, _, _ = load_judge(res.output_dir)
    sd = model.state_dict()
    lora = {k: v for k, v in sd.items() if "lora_" in k}
    assert lora and all("language_model" in k for k in lora), "LoRA must adapt only the language model"
    assert all(lora[k].abs().sum() > 0 for k in lora if "lora_B" in k), "LoRA B starts at zero and must have moved"
    for k, v in sd.items():
        if "lora_" in k:
            continue
        bk = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(v, base[bk]), f"frozen parameter {bk} changed"


def test_saved_judge_reloads_with_identical_outputs(lora_run, data):
    from train.data import RowContext, load_examples
    from train.encode import Encoder, collate

    _, res = lora_run
    before = res.model.eval()
    after, proc, _ = load_judge(res.output_dir)
    exs, _ = load_examples([data["heldout"]], RowContext(allowed_image_dirs=[data["images"]]))
    enc = Encoder(proc, "vision", image_token_id=after.config.image_token_id)
    batch = collate([enc.encode(e) for e in exs[:2]], proc.tokenizer.pad_token_id)
    with torch.no_grad():
        la, lb = before(**batch).logits, after(**batch).logits
    assert torch.equal(la, lb)
    from vlm_judge.chat import apply
    from vlm_judge.images import load_image
    from vlm_judge.prompts import render

    prompt = render(exs[0].request)
    gen = proc(text=[apply(proc, prompt)], images=[load_image(im) for im in prompt.images], return_tensors="pt")
    with torch.no_grad():
        ga = before.generate(**gen, max_new_tokens=6, do_sample=False)
        gb = after.generate(**gen, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)


def test_resume_continues_the_step_count(lora_run, tiny_llava_dir, data, tmp_path):
    import shutil

    cfg, res = lora_run
    # a copy of the run folder holding only the step-10 checkpoint, resumed to step 20
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(res.output_dir / "checkpoints" / "step-10", out / "checkpoints" / "step-10")
    cfg2 = _cfg(tiny_llava_dir, data, out, max_steps=20, resume="latest")
    res2 = train(cfg2)
    assert res2.step == 20 and len(res2.losses) == 10
    # same data order, optimizer and RNG state: the continued run repeats the original steps 11..20
    assert res2.losses == pytest.approx(res.losses[10:], rel=1e-4, abs=1e-4)


def test_full_finetune_freezes_vision_tower(tiny_llava_dir, data, tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(tiny_llava_dir, data, tmp_path / "full", finetune="full", max_steps=3, lr=1e-3, max_rows=6)
    res = train(cfg)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir)).state_dict()
    model, _, card = load_judge(res.output_dir)
    assert card["adapter"] is False
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in changed)
    assert any("language_model" in k for k in changed)


def test_grad_accum_checkpointing_and_projector(tiny_llava_dir, data, tmp_path):
    """4 micro-batches with grad_accum=2 are 2 optimizer steps (rows encoded in a worker process); a
    LoRA run with train_projector trains the projector (modules_to_save) and leaves the vision tower alone."""
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(tiny_llava_dir, data, tmp_path / "acc", max_steps=2, grad_accum=2, gradient_checkpointing=True,
               train_projector=True, max_rows=8, dataloader_workers=1)
    res = train(cfg)
    assert res.step == 2 and len(res.losses) == 2
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir)).state_dict()
    model, _, _ = load_judge(res.output_dir)
    merged = model.merge_and_unload().state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base if "multi_modal_projector" in k)
    assert all(torch.equal(merged[k], base[k]) for k in base if "vision_tower" in k)


def test_text_judge_trains_on_pairs_and_scores(tiny_text_lm_dir, tmp_path):
    _, pairs = rows_for({"astronaut": "x", "chelsea": "y"})
    absolute, _ = rows_for({"coffee": "z"})
    rows = [{k: v for k, v in r.items() if k != "image"} for r in pairs + absolute]  # Feedback-Collection style
    path = write_jsonl(rows, tmp_path / "fc.jsonl")
    cfg = TrainConfig(base_model=str(tiny_text_lm_dir), kind="text", train_data=[str(path)], output_dir=str(tmp_path / "tj"),
                      max_steps=3, per_device_batch_size=2, lr=1e-2, precision="fp32", tensorboard=False)
    res = train(cfg)
    assert res.report.examples == len(absolute) + 2 * len(pairs)  # pairs in both orders
    card = load_card(res.output_dir, required=True)
    assert card["kind"] == "text" and card["adapter"] is True
    pytest.importorskip("vlm_judge.backends.hf")
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.scorer import Judge, ScorerConfig

    judge = Judge.load(str(res.output_dir), config=ScorerConfig(max_parse_retries=0, params=GenerationParams(max_new_tokens=6)))
    out = judge.relative_grade(["Which is right?"], ["A cat."], ["A dog."], "Does it name the animal?")
    assert out[0].mode == "relative" and out[0].raw_output


def test_row_failing_at_training_time_is_replaced(caplog):
    from train.data import RowError
    from train.loop import _EncodedDataset

    class Enc:
        def encode(self, ex):
            if ex == "bad":
                raise RowError("unreadable image: truncated")
            return ex

    class Ex(str):
        source = "rows.jsonl:1"

    ds = _EncodedDataset([Ex("bad"), Ex("good")], Enc())
    assert ds[0] == "good" and ds[1] == "good"
    assert "skipping rows.jsonl:1 at training time: unreadable image" in caplog.text
