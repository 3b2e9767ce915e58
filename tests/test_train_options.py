"""TrainConfig's CPU economies: `target_only_logits` (same loss, LM head only at target positions) and
`freeze_embeddings` (full fine-tuning that leaves the token table and LM head as they were)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from train.config import ConfigError, TrainConfig  # noqa: E402
from train.debug_data import rows_for, write_jsonl  # noqa: E402
from train.loop import target_only_loss, train  # noqa: E402


@pytest.fixture(scope="module")
def rows(sample_images, tmp_path_factory):
    d = tmp_path_factory.mktemp("opt_data")
    absolute, _ = rows_for({k: str(v) for k, v in sample_images.items()})
    text = [{k: v for k, v in r.items() if k != "image"} for r in absolute]  # what a text judge trains on
    return {"vision": str(write_jsonl(absolute, d / "rows.jsonl")), "text": str(write_jsonl(text, d / "text.jsonl"))}


def _batch(model, proc, path, kind):
    from train.data import RowContext, load_examples
    from train.encode import Encoder, collate

    exs, _ = load_examples([path], RowContext(allowed_image_dirs=["/"], kind=kind))
    enc = Encoder(proc, kind, image_token_id=getattr(model.config, "image_token_id", None))
    tok = proc.tokenizer if kind == "vision" else proc
    return collate([enc.encode(e) for e in exs[:4]], tok.pad_token_id)


@pytest.mark.parametrize("kind", ["vision", "text"])
def test_target_only_loss_equals_the_full_loss(kind, rows, tiny_llava_dir, tiny_text_lm_dir) -> None:
    from train.model import load_base

    model, proc = load_base(str(tiny_llava_dir if kind == "vision" else tiny_text_lm_dir), kind)
    batch = _batch(model, proc, rows[kind], kind)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts are masked
    with torch.no_grad():
        full = float(model(**batch).loss)
        cheap = float(target_only_loss(model, batch))
    assert cheap == pytest.approx(full, rel=1e-5, abs=1e-6)
    # the gradient is the same too
    model.zero_grad()
    model(**batch).loss.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    target_only_loss(model, batch).backward()
    for n, p in model.named_parameters():
        if n in g_full:
            assert torch.allclose(p.grad, g_full[n], atol=1e-6, rtol=1e-4), n


def _cfg(base, data, out, **kw) -> TrainConfig:
    args = dict(base_model=str(base), kind="text", train_data=[data["text"]], output_dir=str(out), finetune="full",
                per_device_batch_size=2, lr=1e-3, lr_schedule="constant", precision="fp32", log_every=100,
                tensorboard=False, seed=0, max_steps=3)
    args.update(kw)
    return TrainConfig(**args)


def test_options_in_a_training_run(rows, tiny_text_lm_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    plain = train(_cfg(tiny_text_lm_dir, rows, tmp_path / "plain"))
    opt = train(_cfg(tiny_text_lm_dir, rows, tmp_path / "opt", target_only_logits=True, freeze_embeddings=True))
    # the first step's loss is computed before any update: the same number either way
    assert opt.losses[0] == pytest.approx(plain.losses[0], rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_text_lm_dir)).state_dict()
    after = opt.model.state_dict()
    frozen = [k for k in base if "embed_tokens" in k or k.startswith("lm_head")]
    assert frozen and all(torch.equal(after[k], base[k]) for k in frozen), "embeddings / LM head changed"
    moved = [k for k in base if k not in frozen and not torch.equal(after[k], base[k])]
    assert any("layers.0" in k for k in moved), "the decoder layers did not train"
    # without the option the embeddings do train
    plain_sd = plain.model.state_dict()
    assert not torch.equal(plain_sd["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_freeze_embeddings_needs_full_finetuning(tiny_text_lm_dir) -> None:
    with pytest.raises(ConfigError, match="freeze_embeddings"):
        TrainConfig(base_model="x", kind="text", finetune="lora", freeze_embeddings=True)
    cfg = TrainConfig.load(overrides={"base_model": "x", "kind": "text", "finetune": "full",
                                      "freeze_embeddings": "true", "target_only_logits": "yes"})
    assert cfg.freeze_embeddings is True and cfg.target_only_logits is True
