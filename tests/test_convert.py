"""`vlm-judge convert` on a tiny checkpoint written in the ORIGINAL LLaVA layout (random weights, the
original key names and config.json fields, a tiny CLIP folder beside it), and the vision presets.

The logits test proves the key mapping: the converted model's logits equal a forward pass assembled
by hand from the raw tensors (CLIP hidden state of the selected layer without CLS -> two-layer GELU
projector -> spliced at the image token -> the Llama model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_judge.convert import VICUNA_V1_SYSTEM, ConvertError, convert
from vlm_judge.presets import PRESET_DIR_ENV, JudgeNotFound, locate_judge
from vlm_judge.tiny_models import _CORPUS, _llama_config

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE, PATCH = 32, 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 'patch' selection drops CLS


def _original_tokenizer():
    """A vicuna-like tokenizer: byte-level BPE with <unk>, <s>, </s> and no <image> or pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)


def write_clip_folder(folder: Path, seed: int = 1) -> Path:
    """A whole CLIPModel folder (vision and text halves), like openai/clip-vit-large-patch14-336."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(vision_config=_vision_config().to_dict(), text_config=text, projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def write_original_checkpoint(folder: Path, tower_inside: bool = False, safetensors: bool = False,
                              extra: dict | None = None, drop: str | None = None, seed: int = 2) -> dict:
    """An original LLaVA-1.5 checkpoint folder; returns the raw tensors written."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _original_tokenizer()
    tok.save_pretrained(folder)
    llama_cfg = _llama_config(tok)
    torch.manual_seed(seed)
    raw = dict(LlamaForCausalLM(llama_cfg).state_dict())
    v_hidden, t_hidden = _vision_config().hidden_size, llama_cfg.hidden_size
    raw["model.mm_projector.0.weight"] = torch.randn(t_hidden, v_hidden) * 0.2
    raw["model.mm_projector.0.bias"] = torch.randn(t_hidden) * 0.1
    raw["model.mm_projector.2.weight"] = torch.randn(t_hidden, t_hidden) * 0.2
    raw["model.mm_projector.2.bias"] = torch.randn(t_hidden) * 0.1
    raw["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints stored this buffer
    if tower_inside:
        torch.manual_seed(seed + 10)
        for k, v in CLIPVisionModel(_vision_config()).state_dict().items():
            raw["model.vision_tower.vision_tower.vision_model." + k] = v.clone()
    raw.update(extra or {})
    if drop:
        raw.pop(drop)
    config = {**llama_cfg.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_hidden_size": v_hidden, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
              "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(raw)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for i, part in enumerate(halves, 1):
        shard = {k: raw[k].contiguous() for k in part}
        if safetensors:
            from safetensors.torch import save_file

            save_file(shard, folder / f"model-0000{i}-of-00002.safetensors")
        else:
            torch.save(shard, folder / f"pytorch_model-0000{i}-of-00002.bin")
    return raw


def reference_logits(raw: dict, clip_dir: Path, input_ids: torch.Tensor, pixels: torch.Tensor, image_id: int,
                     tower_inside: bool) -> torch.Tensor:
    """The original model's forward, assembled by hand from the raw tensors."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    tower = CLIPVisionModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    if tower_inside:
        prefix = "model.vision_tower.vision_tower.vision_model."
        tower.load_state_dict({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)})
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # no CLS
        feats = F.linear(F.gelu(F.linear(hidden, raw["model.mm_projector.0.weight"], raw["model.mm_projector.0.bias"])),
                         raw["model.mm_projector.2.weight"], raw["model.mm_projector.2.bias"])
        text = {k: v for k, v in raw.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))
                and not k.endswith("inv_freq")}
        vocab = text["model.embed_tokens.weight"].shape[0]
        llama = LlamaForCausalLM(_llama_config(_original_tokenizer())).eval()
        llama.load_state_dict(text)
        is_image = input_ids == image_id
        embeds = F.embedding(torch.where(is_image, 0, input_ids), text["model.embed_tokens.weight"])
        embeds[is_image] = feats.reshape(-1, feats.shape[-1])
        assert llama.config.vocab_size == vocab
        return llama(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, clip_dir):
    """(raw tensors, converted folder) of a .bin checkpoint whose tower is not stored in it."""
    root = tmp_path_factory.mktemp("llava_orig")
    raw = write_original_checkpoint(root / "src")
    convert(root / "src", clip_dir, root / "out", dtype="float32")
    return raw, root / "out"


def _logits_match(raw, out, clip_dir, tower_inside):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    image_id = model.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    words = processor.tokenizer("Score the answer: a red circle.")["input_ids"]
    ids = torch.tensor([[processor.tokenizer.bos_token_id] + [image_id] * N_IMAGE_TOKENS + words])
    torch.manual_seed(5)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
    want = reference_logits(raw, clip_dir, ids, pixels, image_id, tower_inside)
    old_vocab = want.shape[-1]
    assert got.shape[-1] > old_vocab and got.shape[-1] % 64 == 0
    torch.testing.assert_close(got[..., :old_vocab], want, atol=1e-5, rtol=0)
    return model


def test_converted_checkpoint_gives_the_original_logits(converted, clip_dir):
    raw, out = converted
    model = _logits_match(raw, out, clip_dir, tower_inside=False)
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    # the tower's weights came from the CLIP folder
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(clip_dir)
    assert torch.equal(model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
                       clip.state_dict()["embeddings.patch_embedding.weight"])
    # added rows (<image>, <pad>, padding to 64) sit near the mean of the old embedding rows, as transformers'
    # own conversion draws them
    emb = model.get_input_embeddings().weight
    old = raw["model.embed_tokens.weight"]
    new = emb[old.shape[0]:]
    assert torch.equal(emb[: old.shape[0]], old)
    assert (new - old.mean(0)).abs().max() < 0.05 * old.std() and new.std(0).sum() > 0


def test_converted_folder_carries_processor_chat_format_and_card(converted):
    from transformers import AutoProcessor

    from vlm_judge.card import load_card

    _, out = converted
    card = load_card(out)
    assert card["backend"] == "hf" and card["template"] == "prometheus-vision" and card["kind"] == "vision"
    processor = AutoProcessor.from_pretrained(out)
    assert processor.patch_size == PATCH and processor.num_additional_image_tokens == 1
    assert processor.vision_feature_select_strategy == "default"
    assert processor.image_processor.do_pad  # LLaVA-1.5's image_aspect_ratio 'pad'
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "###Task Description:\nx"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    # LLaVA's conv_vicuna_v1.get_prompt() for one image question
    assert text == f"{VICUNA_V1_SYSTEM} USER: <image>\n###Task Description:\nx ASSISTANT:"
    from PIL import Image

    enc = processor(images=Image.new("RGB", (40, 24), "red"), text=text, return_tensors="pt")
    assert int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == N_IMAGE_TOKENS


def test_tower_stored_in_the_checkpoint_is_used(tmp_path, clip_dir):
    raw = write_original_checkpoint(tmp_path / "src", tower_inside=True, safetensors=True)
    report = convert(tmp_path / "src", clip_dir, tmp_path / "out", dtype="float32")
    assert report.tower_from == "checkpoint" and report.skipped_recomputed == 1
    _logits_match(raw, tmp_path / "out", clip_dir, tower_inside=True)


def test_unknown_and_missing_keys_are_errors_that_list_them(tmp_path, clip_dir):
    write_original_checkpoint(tmp_path / "a", extra={"model.image_newline": torch.zeros(64),
                                                     "model.mm_projector.4.weight": torch.zeros(2)})
    with pytest.raises(ConvertError, match=r"2 unknown keys.*model\.image_newline, model\.mm_projector\.4\.weight"):
        convert(tmp_path / "a", clip_dir, tmp_path / "a_out")
    write_original_checkpoint(tmp_path / "b", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConvertError, match=r"missing keys: model\.language_model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(tmp_path / "b", clip_dir, tmp_path / "b_out")
    assert not (tmp_path / "a_out").exists() and not (tmp_path / "b_out").exists()


def test_convert_command_line(tmp_path, clip_dir, capsys):
    from vlm_judge.cli import main

    write_original_checkpoint(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "o"),
                 "--dtype", "bfloat16"]) == 0
    assert "vision tower from" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert main(["convert", str(tmp_path / "nowhere"), "--vision-tower", str(clip_dir),
                 "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "src"), "--vision-tower", str(tmp_path / "no-clip"), "--out",
                 str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "not a CLIP model folder" in err and "openai/clip-vit-large-patch14-336" in err
    assert len(err.splitlines()) == 1
    assert main(["convert", str(tmp_path / "src"), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "o")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


# ---- presets -----------------------------------------------------------------------------------


def _rows(tmp_path: Path, sample_images) -> Path:
    import shutil

    (tmp_path / "photos").mkdir(exist_ok=True)
    for n in ("chelsea", "coffee"):
        shutil.copy(sample_images[n], tmp_path / "photos" / f"{n}.png")
    rubric = {"criteria": "Does the answer name what is in the photo?",
              **{f"score{i}_description": f"level {i}" for i in range(1, 6)}}
    rows = [{"id": n, "instruction": "What is in the photo?", "response": "A thing.", "rubric": rubric,
             "reference_answer": "An object.", "image": f"photos/{n}.png"} for n in ("chelsea", "coffee")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlm_judge.cli", "score", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)
    return proc, time.perf_counter() - t0


def test_vision_preset_without_weights_fails_in_one_clear_line(tmp_path, sample_images):
    env = {"HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1", PRESET_DIR_ENV: str(tmp_path / "presets")}
    proc, seconds = _score([str(_rows(tmp_path, sample_images)), "--judge", "prometheus-vision-7b", "--out",
                            str(tmp_path / "j.jsonl"), "--no-progress"], env)
    err = proc.stderr.strip()
    print(f"preset without weights: exit {proc.returncode} after {seconds:.1f} s: {err}")
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "prometheus-vision-7b" in err and "kaist-ai/prometheus-vision-7b-v1.0" in err and "not found" in err
    assert seconds < 20  # no model code, no hub retries


def test_a_name_that_is_nothing_fails_at_once(tmp_path, sample_images):
    proc, seconds = _score([str(_rows(tmp_path, sample_images)), "--judge", str(tmp_path / "no" / "such judge"),
                            "--out", str(tmp_path / "j.jsonl"), "--no-progress"], {"HF_HUB_OFFLINE": "1"})
    err = proc.stderr.strip()
    print(f"unknown judge: exit {proc.returncode} after {seconds:.1f} s: {err}")
    assert proc.returncode == 2 and len(err.splitlines()) == 1
    assert f"no judge folder, preset or served model named '{tmp_path / 'no' / 'such judge'}'" in err
    assert "Repo id" not in err and seconds < 20
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlm_judge.cli", "serve", "--judge", "./no/such-judge", "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "no judge folder, preset or served model named './no/such-judge'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and time.perf_counter() - t0 < 20


def test_preset_names_settle_without_weights_for_servers_and_the_mock():
    served = locate_judge("prometheus-vision-7b", served=True)
    assert (served.path, served.template) == ("prometheus-vision-7b", "prometheus-vision")  # the server's name
    mock = locate_judge("prometheus-2-7b", backend="mock")
    assert (mock.name, mock.template) == ("prometheus-eval/prometheus-7b-v2.0", "prometheus")
    assert locate_judge("mock").path == "mock"


def test_original_layout_in_the_preset_folder_names_the_convert_command(tmp_path, monkeypatch):
    monkeypatch.setenv(PRESET_DIR_ENV, str(tmp_path))
    write_original_checkpoint(tmp_path / "prometheus-vision-13b")
    with pytest.raises(JudgeNotFound, match=r"original LLaVA layout.*vlm-judge convert .*prometheus-vision-13b "
                                            r"--vision-tower <folder of openai/clip-vit-large-patch14-336> --out"):
        locate_judge("prometheus-vision-13b")


def test_converted_stand_in_registered_as_the_preset_scores(tmp_path, clip_dir, converted, sample_images):
    import shutil

    _, out = converted
    presets = tmp_path / "presets"
    shutil.copytree(out, presets / "prometheus-vision-7b")
    env = {"HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1", PRESET_DIR_ENV: str(presets)}
    judged = tmp_path / "j.jsonl"
    proc, _ = _score([str(_rows(tmp_path, sample_images)), "--judge", "prometheus-vision-7b", "--out", str(judged),
                      "--no-progress", "--max-new-tokens", "4", "--retries", "0"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in judged.read_text().splitlines()]
    # a random tiny model writes no verdict: each row is a parse failure judged by the preset, not an error
    assert [x["id"] for x in lines] == ["chelsea", "coffee"]
    assert all(x["status"] in ("ok", "parse_failure") and x["raw_output"] for x in lines), lines
    assert {x["judge"] for x in lines} == {"kaist-ai/prometheus-vision-7b-v1.0"}
    assert {x["template"] for x in lines} == {"prometheus-vision"}


def test_published_training_row_reaches_the_model_in_llavas_exact_prompt(converted):
    """The whole chain for a published row: template render -> hf backend -> the converted chat template
    gives conv_vicuna_v1's prompt around the published human turn, byte for byte."""
    from tests.test_published_templates import _PARTS, TRAIN_ROWS, _vision_request
    from vlm_judge.backends.hf import HFBackend
    from vlm_judge.prompts import render
    from vlm_judge.records import Rubric

    _, out = converted
    backend = HFBackend(str(out), device="cpu")
    human = TRAIN_ROWS[0]["conversations"][0]["value"]
    m = _PARTS.fullmatch(human[len("<image>\n"):])
    req = _vision_request(m["instruction"], m["response"], m["reference"],
                          Rubric.from_text(m["criteria"] + "\n" + m["scores"]), TRAIN_ROWS[0]["image"])
    assert backend._chat_text(render(req, "prometheus-vision")) == f"{VICUNA_V1_SYSTEM} USER: {human} ASSISTANT:"
