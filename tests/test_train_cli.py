"""`vlm-judge train tiny-debug.yaml` end to end: the recipe builds its tiny model, trains on the shipped
real-image rows, and writes a judge folder that `vlm-judge score --judge FOLDER` loads as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

RECIPE = Path(__file__).resolve().parents[1] / "train" / "recipes" / "tiny-debug.yaml"


def test_tiny_recipe_trains_and_the_judge_scores(tmp_path):
    from vlm_judge.cli import main as vlm_judge

    out = tmp_path / "judge"
    rc = vlm_judge(["train", str(RECIPE), "--output_dir", str(out), "--max_steps", "4", "--eval_every", "2",
                    "--save_every", "0", "--eval_max_rows", "2", "--eval_max_new_tokens", "4"])
    assert rc == 0
    card = json.loads((out / "vlm_judge.json").read_text())
    assert card["backend"] == "hf" and card["kind"] == "vision" and card["adapter"] is True
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 4 and len(log["losses"]) == 4
    assert [e["step"] for e in log["evals"]] == [2.0, 4.0]

    pytest.importorskip("vlm_judge.backends.hf")
    pytest.importorskip("vlm_judge.score_cmd")
    data = RECIPE.parent / "debug_data"
    rows = tmp_path / "rows.jsonl"
    src = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()][:2]
    rows.write_text("".join(json.dumps({**r, "image": str(data / r["image"])}) + "\n" for r in src))
    scored = tmp_path / "scored.jsonl"
    rc = vlm_judge(["score", str(rows), "--judge", str(out), "--out", str(scored), "--max-new-tokens", "8",
                    "--retries", "0", "--image-root", str(data)])
    assert rc in (0, 1)  # 1 may mean 'some rows did not parse': a 4-step tiny judge writes noise
    lines = [json.loads(line) for line in scored.read_text().splitlines() if line.strip()]
    assert len(lines) == 2 and all("status" in json.dumps(x) for x in lines)


def test_recipe_paths_are_the_recipes_and_flag_paths_the_working_folders(tmp_path, monkeypatch, capsys):
    """One path rule (as in data-build recipes): a recipe's relative paths are relative to the recipe
    file, even for files not made yet; a flag's path is relative to the working folder."""
    import yaml

    from train.cli import main

    sub = tmp_path / "recipes"
    sub.mkdir()
    (sub / "rows.jsonl").write_text("{}\n")
    (sub / "r.yaml").write_text("base_model: org/model\ntrain_data: [later.jsonl]\neval_data: [rows.jsonl]\n"
                                "image_root: images\n")
    monkeypatch.chdir(tmp_path)
    assert main([str(sub / "r.yaml"), "--check"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train_data"] == [str(sub / "later.jsonl")] and cfg["eval_data"] == [str(sub / "rows.jsonl")]
    assert cfg["image_root"] == str(sub / "images") and cfg["base_model"] == "org/model"  # a hub name stays
    # flags: the working folder's paths, in either override spelling
    assert main([str(sub / "r.yaml"), "--eval_data", "rows.jsonl", "lora.r=4", "--check"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["eval_data"] == ["rows.jsonl"] and cfg["lora_r"] == 4
    assert main([str(sub / "r.yaml"), "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_shipped_recipe_by_name_and_its_comment_tells_the_truth(capsys):
    import yaml

    from vlm_judge.cli import main as vlm_judge

    assert vlm_judge(["train", "tiny-debug", "--check"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["base_model"] == "tiny:llava" and resolved["train_data"][0].endswith("debug_data/rows.jsonl")
    rows = [line for line in Path(resolved["train_data"][0]).read_text().splitlines() if line.strip()]
    assert f"{len(rows)} real-image rows" in RECIPE.read_text().splitlines()[0]
    assert vlm_judge(["train", "no-such-recipe", "--check"]) == 2
    assert "shipped recipes: " in capsys.readouterr().err


def test_help_lists_the_recipe_fields_with_defaults_and_docs(capsys):
    from vlm_judge.cli import main as vlm_judge

    assert vlm_judge(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "tiny-debug" in out
    assert "--lora_r (int; default 16)" in out and "--train_data (list[str]; default [])" in out
    assert "Steps between resumable checkpoints" in out  # a field's docstring


@pytest.mark.parametrize("flags, needle", [
    (["--train_data", "missing.jsonl"], "train_data: no such file missing.jsonl"),
    (["--train_data", "{folder}"], "is a folder, not a data file"),
    (["--output_dir", "{file}/judge"], "which is a file"),
    (["--resume", "{folder}/no-checkpoint"], "resume: no checkpoint folder"),
    (["--lr", "fast"], "lr: expected float"),
    (["--base_model", "{folder}/no-model"], "base_model: no such model folder"),
])
def test_wrong_path_or_type_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, flags, needle):
    import time

    from vlm_judge.cli import main as vlm_judge

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    flags = [f.format(folder=tmp_path, file=tmp_path / "a_file") for f in flags]
    t0 = time.perf_counter()
    assert vlm_judge(["train", "tiny-debug", "--output_dir", str(tmp_path / "out"), *flags]) == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing left behind (no _tiny_base)


def test_judge_folder_readme_is_a_model_card_and_training_shows_progress(tmp_path, caplog):
    import logging

    from vlm_judge.cli import main as vlm_judge

    out = tmp_path / "judge"
    with caplog.at_level(logging.INFO, logger="vlm_judge.train"):
        rc = vlm_judge(["train", "tiny-debug", "--output_dir", str(out), "--max_steps", "2", "--eval_every", "2",
                        "--save_every", "0", "--eval_max_rows", "2", "--eval_max_new_tokens", "4", "--log_every", "1"])
    assert rc == 0
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2/2")]
    assert progress and "rows 8/8 (" in progress[0] and "rows/s, ETA" in progress[0]
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card  # peft's empty template is gone
    assert "base_model: " in card and "tiny" in card.split("## Base model")[1].split("##")[0]
    assert "debug_data/rows.jsonl" in card and "`default`" in card  # data and template
    table = card.split("## In-training evaluation")[1]
    assert "| step | " in table and "parse_rate" in table and "\n| 2 | " in table
    assert f"vlm-judge score answers.jsonl --judge {out}" in card and "Judge.load(" in card


def test_check_prints_the_recipe_and_notes_what_a_run_would_stop_on(capsys):
    from vlm_judge.cli import main as vlm_judge

    assert vlm_judge(["train", "tiny-debug", "--train_data", "missing.jsonl", "--check"]) == 0
    captured = capsys.readouterr()
    assert "base_model: tiny:llava" in captured.out
    assert "a run would stop here: train_data: no such file missing.jsonl" in captured.err
