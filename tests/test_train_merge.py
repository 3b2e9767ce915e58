"""Merging an absolute judge and a relative judge (Prometheus 2): exact weighted sums, TIES, loading and scoring."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from train.config import TrainConfig  # noqa: E402
from train.debug_data import rows_for, write_jsonl  # noqa: E402
from train.judge_folder import load_judge  # noqa: E402
from train.loop import train  # noqa: E402
from train.merge import merge_judges  # noqa: E402
from vlm_judge.card import load_card  # noqa: E402


@pytest.fixture(scope="module")
def judges(tiny_llava_dir, sample_images, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    absolute, pairs = rows_for({k: str(v) for k, v in sample_images.items()})
    data = write_jsonl(absolute + pairs, d / "rows.jsonl")
    out = {}
    for mode, r in (("absolute", 8), ("relative", 4)):
        cfg = TrainConfig(
            base_model=str(tiny_llava_dir), train_data=[str(data)], allowed_image_dirs=[str(next(iter(sample_images.values())).parent)],
            mode=mode, output_dir=str(d / mode), max_steps=3, per_device_batch_size=2, lr=1e-2, lora_r=r, lora_alpha=2 * r,
            lora_dropout=0.0, precision="fp32", tensorboard=False, seed=1 if mode == "relative" else 0,
        )
        out[mode] = train(cfg).output_dir
    out["dir"] = d
    return out


def _deltas(folder) -> dict[str, torch.Tensor]:
    """Weight update of every LoRA layer (scaling included), keyed by module name."""
    from peft.tuners.lora import LoraLayer

    model, _, _ = load_judge(folder)
    return {n: m.get_delta_weight(m.active_adapters[0]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_linear_merge_of_adapters_is_the_exact_weighted_sum(judges):
    out = merge_judges([judges["absolute"], judges["relative"]], judges["dir"] / "merged", weights=[0.7, 0.3])
    card = load_card(out, required=True)
    assert card["adapter"] is True and card["merge_method"] == "linear" and card["kind"] == "vision"
    da, dr, dm = _deltas(judges["absolute"]), _deltas(judges["relative"]), _deltas(out)
    assert set(dm) == set(da) and dm
    for name in dm:
        assert torch.allclose(dm[name], 0.7 * da[name] + 0.3 * dr[name], atol=1e-6), name
    # rank of the merged adapter = sum of ranks (8 + 4), no cross terms
    import json

    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12


def test_merged_judge_scores_in_both_modes_through_judge_load(judges, sample_images):
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.scorer import Judge, ScorerConfig

    out = judges["dir"] / "merged_for_scoring"
    merge_judges([judges["absolute"], judges["relative"]], out)
    pytest.importorskip("vlm_judge.backends.hf")
    cfg = ScorerConfig(max_parse_retries=0, params=GenerationParams(max_new_tokens=8))
    judge = Judge.load(str(out), config=cfg)
    img = str(sample_images["chelsea"])
    rubric = {"criteria": "Does the answer name the animal?", **{f"score{i}_description": f"level {i}" for i in range(1, 6)}}
    a = judge.absolute_grade(["What animal is this?"], ["A cat."], rubric, images=[img])
    r = judge.relative_grade(["What animal is this?"], ["A cat."], ["A dog."], rubric, images=[img])
    assert a[0].mode == "absolute" and r[0].mode == "relative"
    for j in a + r:
        assert j.status in ("ok", "parse_failure") and j.raw_output, j  # it ran and wrote text
        assert j.template == "default"

    # the in-training evaluator decodes a model in memory as the hf backend does: same greedy output
    from vlm_judge.backends.hf import HFBackend
    from vlm_judge.prompts import render
    from vlm_judge.records import JudgeRequest, Rubric

    model, proc, _ = load_judge(out)
    req = JudgeRequest("What animal is this?", "A cat.", Rubric.from_dict(rubric),
                       images=(__import__("vlm_judge.images").images.resolve_image(img),))
    mine = HFBackend.from_model(model, proc).generate([render(req)], GenerationParams(max_new_tokens=8))
    theirs = judge.backend.generate([render(req)], GenerationParams(max_new_tokens=8))
    assert mine[0].text == theirs[0].text


def test_ties_merge_gives_loadable_full_weights(judges, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    out = merge_judges([judges["absolute"], judges["relative"]], judges["dir"] / "ties", method="ties", density=0.5)
    card = load_card(out, required=True)
    assert card["adapter"] is False and card["merge_method"] == "ties" and card["merge_density"] == 0.5
    model, _, _ = load_judge(out)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_llava_dir)).state_dict()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], base[k]) for k in sd if "vision_tower" in k)  # untouched by either judge
    changed = [k for k in sd if "language_model" in k and not torch.equal(sd[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)


def test_merge_refuses_judges_of_different_bases(judges, tiny_text_lm_dir, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(judges["relative"], other, ignore=shutil.ignore_patterns("checkpoints", "_tiny_base"))
    card = json.loads((other / "vlm_judge.json").read_text())
    card["base_model"] = str(tiny_text_lm_dir)
    (other / "vlm_judge.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="different base models"):
        merge_judges([judges["absolute"], other], tmp_path / "x")


def _card_only_judge(folder, **card):
    import json

    folder.mkdir(parents=True)
    (folder / "vlm_judge.json").write_text(json.dumps({"backend": "hf", "template": "default", "kind": "vision",
                                                       "base_model": "b", "adapter": True, **card}))
    return folder


def test_merge_refuses_a_symlink_that_leaves_the_source_folder(tmp_path, capsys):
    from train.merge import main as merge_main

    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    a = _card_only_judge(tmp_path / "a")
    b = _card_only_judge(tmp_path / "b")
    (b / "special_tokens_map.json").symlink_to(secret)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="symlink to .*id_rsa, outside the judge folder"):
        merge_judges([a, b], out)
    assert not out.exists()  # refused before anything was written
    assert merge_main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "outside the judge folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_merge_accepts_links_inside_the_folder_and_names_a_missing_judge(tmp_path, capsys):
    from train.merge import check_no_outside_links
    from train.merge import main as merge_main

    a = _card_only_judge(tmp_path / "a")
    (a / "tokenizer.json").write_text("{}")
    (a / "tok.json").symlink_to(a / "tokenizer.json")
    check_no_outside_links(a)
    assert merge_main([str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "nope is not a judge folder" in err and "Traceback" not in err
