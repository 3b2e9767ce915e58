"""TrainConfig and recipes: every shipped recipe loads and validates; conflicts name the fields; flags override."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train.cli import main as train_main
from train.cli import parse_overrides
from train.config import ConfigError, TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"llava-1.5-7b-lora", "llava-1.5-7b-full", "mistral-7b-text-lora", "tiny-debug"} <= names


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = TrainConfig.load(recipe)
    assert cfg.base_model and cfg.train_data
    # a saved recipe is a saved instance: it round-trips
    again = TrainConfig(**yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_shipped_recipe_details():
    lora = TrainConfig.load(RECIPES / "llava-1.5-7b-lora.yaml")
    assert (lora.kind, lora.finetune, lora.lora_r, lora.base_model) == ("vision", "lora", 16, "llava-hf/llava-1.5-7b-hf")
    full = TrainConfig.load(RECIPES / "llava-1.5-7b-full.yaml")
    assert full.finetune == "full" and full.freeze_vision_tower and full.train_projector
    text = TrainConfig.load(RECIPES / "mistral-7b-text-lora.yaml")
    assert text.kind == "text" and "Mistral-7B-Instruct" in text.base_model
    tiny = TrainConfig.load(RECIPES / "tiny-debug.yaml")
    assert tiny.base_model == "tiny:llava"
    assert all(Path(p).is_file() for p in tiny.train_data + tiny.eval_data)  # recipe-relative paths resolved


@pytest.mark.parametrize("name", sorted(p.name for p in (RECIPES / "accelerate").glob("*.yaml")))
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(RECIPES / "accelerate" / name))
    assert cfg.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert cfg.mixed_precision == "bf16"


def test_all_four_accelerate_setups_shipped():
    assert {p.stem for p in (RECIPES / "accelerate").glob("*.yaml")} == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"kind": "text", "train_projector": True}, ["train_projector", "kind"]),
        ({"finetune": "full", "merge_adapter_on_save": True}, ["merge_adapter_on_save", "finetune"]),
        ({"finetune": "full", "lora_target": ".*q_proj"}, ["lora_target", "finetune"]),
        ({"finetune": "lora", "freeze_vision_tower": False}, ["freeze_vision_tower", "finetune"]),
        ({"eval_data": ["a.jsonl"], "eval_fraction": 0.1}, ["eval_data", "eval_fraction"]),
        ({"eval_every": 10}, ["eval_every"]),
        ({"kind": "audio"}, ["kind"]),
        ({"reference_dropout": 1.5}, ["reference_dropout"]),
        ({"per_device_batch_size": 0}, ["per_device_batch_size"]),
    ],
)
def test_conflicting_options_fail_naming_the_fields(fields, named):
    with pytest.raises(ConfigError) as e:
        TrainConfig(base_model="m", **fields)
    for name in named:
        assert name in str(e.value)


def test_unknown_field_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("base_model: m\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.load(p)


def test_flags_override_the_recipe_with_types(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("base_model: m\nlora:\n  r: 16\nlr: 0.001\ntrain_data: [a.jsonl]\n")
    overrides, switches = parse_overrides(["--lr", "1e-4", "--lora.r=8", "--gradient-checkpointing", "true",
                                           "--train_data", "x.jsonl,y.jsonl", "--image_rewrites", "{'../a/': '/d/'}", "--check"])
    assert switches == {"check"}
    cfg = TrainConfig.load(p, overrides)
    assert cfg.lr == 1e-4 and cfg.lora_r == 8 and cfg.gradient_checkpointing is True
    assert cfg.train_data == ["x.jsonl", "y.jsonl"] and cfg.image_rewrites == {"../a/": "/d/"}


def test_cli_check_prints_resolved_recipe(capsys):
    rc = train_main([str(RECIPES / "llava-1.5-7b-lora.yaml"), "--lr", "5e-5", "--check"])
    assert rc == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 5e-5 and printed["lora_r"] == 16


def test_cli_bad_recipe_exits_2_with_the_field(capsys):
    rc = train_main([str(RECIPES / "tiny-debug.yaml"), "--kind", "text", "--train_projector", "true"])
    assert rc == 2
    assert "train_projector" in capsys.readouterr().err
