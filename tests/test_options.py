"""The one option grammar: KEY=VALUE pairs, recipe overrides, the recipe path rule and the judge options."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_judge.judge_options import JudgeOptions, add_judge_options, judge_kwargs, split_urls
from vlm_judge.options import ConfigError, parse_overrides, parse_pairs, recipe_path, set_dotted, yaml_value

REPO = Path(__file__).resolve().parents[1]


def test_parse_pairs_value_conversions():
    assert parse_pairs(["n=3", "x=[1, 2]", "s=cuda:0"], "--backend-arg", json_values=True) == {
        "n": 3, "x": [1, 2], "s": "cuda:0"}
    assert parse_pairs(["export=[jsonl, pairwise]"], "o", value=yaml_value) == {"export": ["jsonl", "pairwise"]}
    with pytest.raises(ConfigError, match="--backend-arg expects KEY=VALUE"):
        parse_pairs(["oops"], "--backend-arg")


def test_overrides_take_both_spellings_and_name_bad_ones():
    got, switches = parse_overrides(["teacher.model=m", "--lora.r", "8", "--lr=1e-4", "--check", "--x-y", "a=b"],
                                    switches=("check", "help"))
    assert got == {"teacher.model": "m", "lora.r": "8", "lr": "1e-4", "x_y": "a=b"} and switches == {"check"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["oops"])
    with pytest.raises(ConfigError, match="--lr needs a value"):
        parse_overrides(["--lr"])
    with pytest.raises(ConfigError, match="empty field"):
        parse_overrides(["teacher.=x"])
    tree = {"teacher": {"model": "a"}, "out": "x"}
    set_dotted(tree, "teacher.model", "b")
    assert tree["teacher"]["model"] == "b"
    with pytest.raises(ConfigError, match="unknown field 'modle'"):
        set_dotted(tree, "teacher.modle", "b")
    with pytest.raises(ConfigError, match="'out' is not a section"):
        set_dotted(tree, "out.x", 1)


def test_recipe_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert recipe_path("data.jsonl", tmp_path) == str(tmp_path / "data.jsonl")
    assert recipe_path("missing/images", tmp_path) == str(tmp_path / "missing/images")
    assert recipe_path("/abs/x", tmp_path) == "/abs/x" and recipe_path("https://h/x", tmp_path) == "https://h/x"
    # a model name may be a hub id: kept unless it exists next to the recipe
    assert recipe_path("org/model", tmp_path, model_name=True) == "org/model"
    assert recipe_path("./org/model", tmp_path, model_name=True) == str(tmp_path / "org/model")


def _args(*argv: str, generation: bool = True) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_judge_options(p, generation=generation)
    return p.parse_args(list(argv))


def test_judge_options_resolve_backend_urls_and_scorer_config():
    backend, kw, cfg = judge_kwargs(_args("--base-url", "http://h:1/v1", "--backend-arg", "timeout=300",
                                          "--backend-arg", "concurrency=4", "--temperature", "0.5", "--retries", "1"),
                                    "mock", batch_size=3)
    assert backend == "openai"  # a URL wins over the name 'mock'
    assert kw == {"timeout": 300, "concurrency": 4, "base_url": "http://h:1/v1"}
    assert (cfg.max_parse_retries, cfg.batch_size, cfg.params.temperature, cfg.template) == (1, 3, 0.5, "default")
    assert judge_kwargs(_args(), "mock")[0] == "mock"
    assert judge_kwargs(_args("--backend", "hf", "--base-url", "http://h:1/v1"), "mock")[0] == "hf"
    assert judge_kwargs(_args("--max-parse-retries", "0"), "mock")[2].max_parse_retries == 0  # old spelling
    with pytest.raises(ValueError, match="unknown template"):
        judge_kwargs(_args("--template", "nope-template"), "mock")


def test_two_served_judges_on_two_servers():
    opts = JudgeOptions.from_args(_args("--base-url", "a=http://h1:8000/v1", "--base-url", "b=http://h2:8000/v1",
                                        "--base-url", "http://shared:8000/v1?x=1"))
    assert opts.urls_for("a") == ["http://h1:8000/v1"] and opts.urls_for("b") == ["http://h2:8000/v1"]
    assert opts.urls_for("c") == ["http://shared:8000/v1?x=1"]
    assert opts.backend_kwargs(["u1", "u2"])["base_urls"] == ["u1", "u2"]
    with pytest.raises(ConfigError, match="NAME=URL"):
        split_urls(["a=not-a-url"])


def test_serve_style_options_leave_out_generation():
    args = _args("--backend", "mock", generation=False)
    assert not hasattr(args, "temperature") and not hasattr(args, "retries")
    opts = JudgeOptions.from_args(args)
    assert opts.backend == "mock" and opts.retries == 2


def test_bad_generation_settings_are_config_errors():
    with pytest.raises(ConfigError, match="--retries"):
        JudgeOptions.from_args(_args("--retries", "-1"))


def test_subcommands_are_not_shadowed_by_files_in_the_working_folder(tmp_path):
    """`python -m vlm_judge.cli train ...` from a folder holding train.py and eval.py."""
    (tmp_path / "train.py").write_text("raise SystemExit('the user file was imported')\n")
    (tmp_path / "eval.py").write_text("raise SystemExit('the user file was imported')\n")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for cmd in (["train", "--help"], ["eval", "--help"]):
        r = subprocess.run([sys.executable, "-m", "vlm_judge.cli", *cmd], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "user file" not in r.stdout + r.stderr and "usage" in r.stdout


def test_output_paths_are_checked_before_anything_loads(tmp_path, capsys):
    """`--out` that is a folder (score) or a file (eval), or lies under a file: one line, exit 2."""
    from eval.cli import main as eval_main
    from vlm_judge.cli import main as vlm_main
    from vlm_judge.options import output_problem

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "q", "response": "r", "rubric": {"criteria": "c"}}\n')
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    assert output_problem(tmp_path / "new" / "o.jsonl", folder=False) is None
    for out in ("a_dir", "a_file/o.jsonl"):
        assert vlm_main(["score", str(rows), "--judge", "mock", "--out", str(tmp_path / out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "--out" in err
    assert eval_main([str(rows), "--judge", "mock", "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
