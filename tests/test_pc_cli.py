"""`vlm-judge data build`: shipped recipes load and validate, bad recipes and flags exit 2 with the
field named, overrides apply, and a build from a recipe file runs over a real teacher server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from perception_collection.cli import main, shipped_recipes
from perception_collection.config import BuildConfig, ConfigError
from tests.pc_script import ScriptedVLM
from vlm_judge.cli import main as vlm_judge_main
from tests.fault_server import Fault, start_server


def test_every_shipped_recipe_loads_validates_and_round_trips():
    recipes = shipped_recipes()
    assert {"coco-small", "mmmu-small", "folder-openai"} <= set(recipes)
    for name, path in recipes.items():
        cfg = BuildConfig.from_yaml(path)
        assert cfg.teacher.kind in ("openai", "hf", "answer_grounded"), name
        assert BuildConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # the saved form reloads


def test_dry_run_prints_the_resolved_recipe_with_overrides(capsys):
    assert main(["build", "coco-small", "--dry-run", "--limit", "3", "--out", "runs/x",
                 "teacher.base_url=http://gpu:9000/v1", "counts.rubrics_per_image=4", "filters.max_length_ratio=2.5",
                 "export=[jsonl, pairwise]"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["filters"]["max_length_ratio"] == 2.5 and d["export"] == ["jsonl", "pairwise"]
    assert d["source"]["limit"] == 3 and d["out"] == "runs/x"
    assert d["teacher"]["base_url"] == "http://gpu:9000/v1" and d["counts"]["rubrics_per_image"] == 4


@pytest.mark.parametrize("recipe, flags, needle", [
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "openai", "model": "m"}}, [], "teacher.base_url"),
    ({"source": {"kind": "coco", "images": "x", "captions": "c.json"}, "teacher": {"kind": "answer_grounded"}}, [],
     "source.kind 'easyvqa'"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}, "colour": 3}, [], "colour"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}, "length_ratio": 0.5}, [],
     "length_ratio"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}, "export": ["csv"]}, [], "export"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}, "filters": {"nope": 1}}, [],
     "nope"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}}, ["teacher.modle=x"], "modle"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}}, ["--limit", "0"], "source.limit"),
    ({"source": {"kind": "folder", "path": "x"}, "teacher": {"kind": "hf", "model": "m"}}, ["oops"], "KEY=VALUE"),
])
def test_bad_recipes_and_flags_exit_2_naming_the_field(tmp_path, capsys, recipe, flags, needle):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    assert main(["build", str(p), *flags]) == 2
    assert needle in capsys.readouterr().err


def test_missing_recipe_and_bad_usage_exit_2(capsys, tmp_path):
    assert main(["build", str(tmp_path / "none.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    assert main(["build"]) == 2
    assert main(["frobnicate"]) == 2


def test_config_errors_are_raised_in_post_init():
    with pytest.raises(ConfigError, match="teacher.concurrency"):
        BuildConfig(source={"kind": "folder", "path": "x"}, teacher={"kind": "hf", "model": "m", "concurrency": 0})


@pytest.fixture
def photo_dir(tmp_path, sample_images):
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("astronaut", "chelsea"):
        Image.open(sample_images[name]).save(d / f"{name}.png")
    return d


def _recipe(tmp_path, photo_dir, base_url) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({
        "source": {"kind": "folder", "path": str(photo_dir)},
        "counts": {"rubrics_per_image": 1, "instructions_per_rubric": 2},
        "teacher": {"kind": "openai", "model": "scripted-vlm", "base_url": base_url, "concurrency": 2,
                    "max_retries": 0},
        "export": ["jsonl", "parquet", "feedback_collection"],
        "out": str(tmp_path / "default-out"),
    }))
    return p


def test_vlm_judge_data_build_runs_a_recipe_over_a_real_server(tmp_path, photo_dir, capsys):
    with start_server(ScriptedVLM()) as srv:
        recipe = _recipe(tmp_path, photo_dir, srv.base_url)
        out = tmp_path / "run"
        assert vlm_judge_main(["data", "build", str(recipe), "--out", str(out), "--limit", "1"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: " in printed and "score   examples" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["images"] == 1 and s["counts"]["kept"] == 10  # 1 image x 1 rubric x 2 instructions x 5
    assert (out / "export" / "perception_collection.parquet").is_file()
    # photos without metadata have no caption: the text-only export skips them, and says so
    assert s["drops"] == {"export:feedback_collection": {"no caption for image '<path>'": 10}}
    saved = BuildConfig.from_yaml(out / "recipe.yaml")  # the resolved recipe, flags applied
    assert saved.out == str(out) and saved.source.limit == 1


def test_build_where_every_teacher_call_fails_exits_1(tmp_path, photo_dir, capsys):
    with start_server(ScriptedVLM(), faults=lambda n, body: Fault(503, message="down for maintenance")) as srv:
        recipe = _recipe(tmp_path, photo_dir, srv.base_url)
        assert main(["build", str(recipe), "--no-progress"]) == 1
    assert "no example was produced" in capsys.readouterr().err
    drops = [json.loads(line) for line in (tmp_path / "default-out" / "drops.jsonl").read_text().splitlines()]
    assert len(drops) == 2 and all("HTTP 503" in d["reason"] and "down for maintenance" in d["reason"] for d in drops)


def test_second_build_in_the_same_folder_is_refused_while_one_runs(tmp_path, photo_dir, capsys):
    from perception_collection.store import run_lock

    with start_server(ScriptedVLM()) as srv:
        recipe = _recipe(tmp_path, photo_dir, srv.base_url)
        out = tmp_path / "default-out"
        out.mkdir()
        with run_lock(out):  # as if another process were building there
            assert main(["build", str(recipe), "--no-progress"]) == 1
        assert "another build is running" in capsys.readouterr().err
        assert main(["build", str(recipe), "--no-progress"]) == 0  # released: it runs
    assert "score   examples" in capsys.readouterr().out


def test_shipped_coco_recipe_runs_with_its_paths_pointed_at_real_files(tmp_path, sample_images, capsys):
    """The recipe users copy works as shipped once its paths and server are set by overrides."""
    img_dir = tmp_path / "val2017"
    img_dir.mkdir()
    images = []
    for i, name in enumerate(("astronaut", "chelsea"), start=1):
        Image.open(sample_images[name]).convert("RGB").save(img_dir / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": 1, "image_id": 1, "caption": "An astronaut with a helmet."},
        {"id": 2, "image_id": 2, "caption": "A cat with orange fur."}]}))
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "person"}],
                                                         "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}))
    with start_server(ScriptedVLM()) as srv:
        rc = main(["build", "coco-small", "--out", str(tmp_path / "run"), "--no-progress",
                   f"source.images={img_dir}", f"source.captions={tmp_path / 'captions.json'}",
                   f"source.instances={tmp_path / 'instances.json'}", f"teacher.base_url={srv.base_url}",
                   "teacher.model=scripted-vlm", "counts.instructions_per_rubric=1"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["counts"]["images"] == 2 and s["counts"]["kept"] == 20  # 2 images x 2 rubrics x 1 x 5
    fc = [json.loads(line) for line in (tmp_path / "run" / "export" / "feedback_collection.jsonl").read_text().splitlines()]
    assert len(fc) == 20 and any("An astronaut with a helmet." in r["instruction"] for r in fc)
