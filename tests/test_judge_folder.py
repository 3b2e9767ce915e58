"""A trained LoRA judge folder: it can be moved as a whole, and its in-training evaluation decodes
exactly as `vlm-judge score` does with the saved judge."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from train.config import TrainConfig  # noqa: E402
from train.data import RowContext, load_examples  # noqa: E402
from train.debug_data import rows_for, write_jsonl  # noqa: E402
from train.encode import Encoder  # noqa: E402
from train.evaluate import heldout_judgments, metrics  # noqa: E402
from train.loop import train  # noqa: E402

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def run(sample_images, tmp_path_factory):
    """A LoRA judge trained from 'tiny:llava', whose base is built into the judge folder."""
    d = tmp_path_factory.mktemp("judge_folder")
    absolute, _ = rows_for({k: str(v) for k, v in sample_images.items()})
    heldout = [r for r in absolute if r["id"].startswith("rocket")]
    images = str(next(iter(sample_images.values())).parent)
    cfg = TrainConfig(
        base_model="tiny:llava", kind="vision", train_data=[str(write_jsonl(absolute, d / "rows.jsonl"))],
        eval_data=[str(write_jsonl(heldout, d / "heldout.jsonl"))], allowed_image_dirs=[images],
        output_dir=str(d / "judge"), max_steps=3, per_device_batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8,
        lora_dropout=0.0, precision="fp32", tensorboard=False, seed=0, save_every=0, eval_every=0,
        eval_batch_size=4, eval_max_new_tokens=NEW_TOKENS,
    )
    return cfg, train(cfg), d, images


def _score(judge, rows, out, images) -> list[dict]:
    from vlm_judge.cli import main as vlm_judge

    rc = vlm_judge(["score", str(rows), "--judge", str(judge), "--out", str(out), "--max-new-tokens", str(NEW_TOKENS),
                    "--retries", "0", "--no-swap", "--batch-size", "4", "--image-allow", images, "--no-progress"])
    assert rc in (0, 1)  # 1: some rows did not parse (a 3-step tiny judge writes noise)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def test_lora_judge_folder_stores_its_base_relative_and_scores_after_a_move(run, tmp_path):
    pytest.importorskip("vlm_judge.backends.hf")
    from vlm_judge.card import load_card

    cfg, res, d, images = run
    card = load_card(res.output_dir)
    adapter_cfg = json.loads((res.output_dir / "adapter_config.json").read_text())
    assert card["adapter"] is True
    assert card["base_model"] == "_tiny_base/tiny-llava"
    assert adapter_cfg["base_model_name_or_path"] == "_tiny_base/tiny-llava"

    moved = tmp_path / "elsewhere" / "judge"
    shutil.copytree(res.output_dir, moved, ignore=shutil.ignore_patterns("checkpoints"))
    # the original (and so its absolute base path) is gone: only the moved folder can serve
    hidden = res.output_dir.with_name("judge-hidden")
    res.output_dir.rename(hidden)
    try:
        lines = _score(moved, d / "heldout.jsonl", tmp_path / "scored.jsonl", images)
    finally:
        hidden.rename(res.output_dir)
    assert len(lines) == len((d / "heldout.jsonl").read_text().splitlines()) == 4
    assert all(x["status"] in ("ok", "parse_failure") and x["raw_output"] for x in lines), lines


def test_in_training_eval_equals_vlm_judge_score_with_the_saved_judge(run, tmp_path):
    pytest.importorskip("vlm_judge.backends.hf")
    cfg, res, d, images = run
    examples, _ = load_examples(cfg.eval_data, RowContext(allowed_image_dirs=[images]))
    encoder = Encoder(res.processor, "vision", cfg.template)
    mine = heldout_judgments(res.model, encoder, examples, cfg.eval_batch_size, NEW_TOKENS)
    theirs = {x["id"]: x for x in _score(res.output_dir, d / "heldout.jsonl", tmp_path / "scored.jsonl", images)}
    assert len(mine) == len(theirs) == 4
    for j in mine:
        t = theirs[j.id]
        assert (j.raw_output, j.score, j.status) == (t["raw_output"], t["score"], t["status"])
    assert j.raw_output  # the decoder wrote text
    # the metrics logged at the end of training are those of the saved judge's scores
    logged = json.loads((res.output_dir / "train_log.json").read_text())["evals"][-1]
    step = int(logged.pop("step"))
    assert json.dumps(logged, sort_keys=True) == json.dumps(metrics(mine, examples), sort_keys=True)  # NaN-safe
    # and the judgments behind them were written through the judgment store, as score writes them
    saved = [json.loads(x) for x in (res.output_dir / "eval" / f"step-{step}.jsonl").read_text().splitlines()]
    assert [(x["id"], x["raw_output"], x["score"]) for x in saved] == [(j.id, j.raw_output, j.score) for j in mine]
    assert all("fingerprint" in x for x in saved)


def test_only_existing_paths_inside_the_folder_become_relative(tmp_path, monkeypatch):
    from train.judge_folder import relative_to_folder
    from vlm_judge.card import resolve_base_model

    (tmp_path / "_tiny_base" / "tiny-llava").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # a hub name resolved against the cwd would land inside the folder
    assert relative_to_folder(tmp_path, str(tmp_path / "_tiny_base" / "tiny-llava")) == "_tiny_base/tiny-llava"
    assert relative_to_folder(tmp_path, "org/model") == "org/model"
    assert relative_to_folder(tmp_path / "work", str(tmp_path / "_tiny_base")) == str(tmp_path / "_tiny_base")
    assert resolve_base_model(tmp_path, "_tiny_base/tiny-llava") == str(tmp_path / "_tiny_base" / "tiny-llava")
    assert resolve_base_model(tmp_path, "org/model") == "org/model"
