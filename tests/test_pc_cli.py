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
from tests.fault_server import Fault, start_server
from tests.pc_script import ScriptedVLM
from vlm_judge.cli import main as vlm_judge_main


def test_every_shipped_recipe_loads_validates_and_round_trips():
    recipes = shipped_recipes()
    assert {"coco-small", "mmmu-small", "folder-openai"} <= set(recipes)
    for name, path in recipes.items():
        cfg = BuildConfig.from_yaml(path)
        assert cfg.teacher.kind in ("openai", "hf", "answer_grounded"), name
        assert BuildConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # the saved form reloads


def _coco_files(root: Path) -> Path:
    """The files the shipped coco-small recipe names, and a copy of the recipe beside them (a
    recipe's relative paths are relative to the recipe file)."""
    import shutil

    from perception_collection.cli import RECIPES_DIR

    (root / "data/coco/val2017").mkdir(parents=True)
    for name in ("captions_val2017.json", "instances_val2017.json"):
        (root / "data/coco/annotations" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data/coco/annotations" / name).write_text("{}")
    return Path(shutil.copy(RECIPES_DIR / "coco-small.yaml", root / "coco-small.yaml"))


def test_dry_run_prints_the_resolved_recipe_with_overrides(capsys, tmp_path, monkeypatch):
    recipe = _coco_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(recipe), "--dry-run", "--limit", "3", "--out", "runs/x",
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


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, photo_dir, capsys, monkeypatch):
    """A recipe beside its data runs from any working folder; an override's path is the working folder's."""
    with start_server(ScriptedVLM()) as srv:
        recipe = _recipe(tmp_path, photo_dir, srv.base_url)
        d = yaml.safe_load(recipe.read_text())
        d["source"]["path"] = "photos"  # relative to the recipe's folder (tmp_path)
        recipe.write_text(yaml.safe_dump(d))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert main(["build", str(recipe), "--dry-run"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["source"]["path"] == str(photo_dir)
        assert main(["build", str(recipe), "--out", str(tmp_path / "run"), "--limit", "1", "--no-progress"]) == 0
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["counts"]["kept"] == 10
        capsys.readouterr()
        (elsewhere / "mine").mkdir()
        assert main(["build", str(recipe), "--dry-run", "source.path=mine"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["source"]["path"] == "mine"


def test_teacher_backend_args_take_key_value_text(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert main(["build", "folder-openai", "--dry-run", "source.path=photos",
                 "teacher.backend_args=prefix_mode=message,backoff=0.1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["teacher"]["backend_args"] == {"prefix_mode": "message", "backoff": 0.1}
    assert main(["build", "folder-openai", "--dry-run", "teacher.backend_args=oops"]) == 2
    assert "teacher.backend_args expects KEY=VALUE" in capsys.readouterr().err


def test_one_config_error_for_every_recipe():
    from train.config import ConfigError as TrainConfigError
    from vlm_judge.options import ConfigError as CoreConfigError

    assert ConfigError is CoreConfigError and TrainConfigError is CoreConfigError


def test_dry_run_fails_when_the_source_files_do_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["build", "coco-small", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "source file(s) not found: source.images=" in err and "data/coco/val2017" in err
    assert "captions_val2017.json" in err and "source.FIELD=PATH" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, needle", [
    ("counts.rubrics_per_image=abc", "counts.rubrics_per_image must be int, got 'abc'"),
    ("teacher.temperature=hot", "teacher.temperature must be float, got 'hot'"),
    ("filters.check_consistency=maybe", "filters.check_consistency must be bool, got 'maybe'"),
    ("seeds.categories=7", "seeds.categories must be list or null, got 7"),
    ("export={a: 1}", "export must be list, got {'a': 1}"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_field_and_type(tmp_path, monkeypatch, capsys, flag, needle):
    _coco_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["build", "coco-small", flag, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_out_that_is_a_file_or_lies_under_one_exits_2_before_any_work(tmp_path, photo_dir, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    recipe = _recipe(tmp_path, photo_dir, "http://127.0.0.1:9/v1")
    for out, needle in ((f, "is a file, not a folder"), (f / "run", "which is a file")):
        assert main(["build", str(recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_recipes_are_listed_with_one_line_each_and_easyvqa_ships(capsys):
    assert main(["recipes"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.split()[0] in shipped_recipes()}
    assert set(listed) == set(shipped_recipes()) and "easyvqa" in listed
    assert all(len(desc) > 20 for desc in listed.values())
    assert "offline" in listed["easyvqa"].lower()


def test_shipped_easyvqa_recipe_builds_offline(tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "run"
    assert main(["build", "easyvqa", "--out", str(out), "--limit", "3", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["images"] == 3 and s["counts"]["kept"] == 15 and s["teacher"] == {}


def test_a_local_teacher_model_path_that_does_not_exist_is_one_line_at_once(tmp_path, photo_dir, capsys):
    import time

    t0 = time.perf_counter()
    assert main(["build", "folder-openai", f"source.path={photo_dir}", "teacher.kind=hf",
                 f"teacher.model={tmp_path}/no-model", "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err
    assert "teacher.model=" in err and "no such model folder" in err and len(err.strip().splitlines()) == 1


def test_a_single_export_format_may_be_given_as_a_string(tmp_path, monkeypatch, capsys):
    recipe = _coco_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(recipe), "export=jsonl", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["export"] == ["jsonl"]
