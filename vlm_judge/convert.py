"""`vlm-judge convert SRC --vision-tower CLIP_DIR --out DST`: an original LLaVA(-1.5) checkpoint -> a
transformers `LlavaForConditionalGeneration` judge folder.

Published LLaVA-family judges (Prometheus-Vision 7B/13B) were released in the layout of the original
LLaVA code (`LlavaLlamaForCausalLM`: `model.layers.*`, `model.mm_projector.{0,2}.*`, `lm_head.weight`,
`mm_*` fields in config.json, the CLIP tower named in `mm_vision_tower` and usually not stored),
which transformers does not load. The conversion:

- weights: sharded `pytorch_model-*.bin` (read with `weights_only=True`) or safetensors; every key is
  mapped or the conversion stops with the list of unknown keys (and of missing ones). Only buffers
  the model recomputes (`rotary_emb.inv_freq`, `position_ids`) are skipped, and counted;
- the vision tower: the checkpoint's own (`model.vision_tower.vision_tower.*`) when stored, else the
  CLIP folder's weights; the CLIP folder always gives the tower's config and image preprocessing;
- config: `vision_feature_layer` = `mm_vision_select_layer`, `vision_feature_select_strategy` from
  `mm_vision_select_feature` ('patch' -> 'default', 'cls_patch' -> 'full'), one additional image token
  (CLS); images padded to square with the mean colour when `image_aspect_ratio` is 'pad' (LLaVA-1.5);
- tokenizer: `<image>` (and `<pad>` when there is none) added as in transformers' own llava conversion,
  the embeddings and lm_head resized to a multiple of 64 with the new rows drawn from a normal around
  the mean of the old embedding rows (covariance 1e-5 x theirs, as that script does; seeded here);
- the chat template of the original conversation format (LLaVA's `vicuna_v1`: its system line, then
  `USER: <image>\\n... ASSISTANT:`), and the judge card, so `vlm-judge score --judge DST` needs no flag.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_judge import __version__

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# LLaVA's conv_vicuna_v1 (separator style TWO: " " after a user turn, "</s>" after an assistant turn),
# with the image first in the user turn as LLaVA writes it ("<image>\n" + text). A system message given
# by the caller replaces the default line. `{{ '\n' }}`: templates render with trim_blocks.
VICUNA_V1_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' %}{% set turns = messages %}{% endif %}"
    "{{ system }}{{ ' ' }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{{ message['content'][0]['text'] }}{% endif %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_SELECT = {"patch": "default", "cls_patch": "full"}
# the CLIP folder may be a whole CLIPModel: its text half is not part of the tower
_CLIP_TEXT_HALF = ("text_model.", "text_projection", "visual_projection", "logit_scale")
_TOWER_IN_CKPT = "model.vision_tower.vision_tower.vision_model."
# buffers the model recomputes; old checkpoints stored them
_RECOMPUTED = (".rotary_emb.inv_freq", "embeddings.position_ids")
_IMAGE_PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                           "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


class ConvertError(ValueError):
    """The source is not a convertible LLaVA checkpoint; the message says what is wrong."""


@dataclass
class ConvertReport:
    """What a conversion did (printed by the command, stored in the judge card)."""

    out: str
    tower_from: str
    """'checkpoint' or the CLIP folder."""
    tensors: int = 0
    skipped_recomputed: int = 0
    clip_text_half_ignored: int = 0
    vocab: tuple[int, int] = (0, 0)
    """(old, new) embedding rows."""
    image_token_id: int = -1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _load_original_state_dict(src: Path) -> dict[str, Any]:
    import torch

    bins = sorted(glob.glob(str(src / "pytorch_model*.bin")))
    safes = sorted(glob.glob(str(src / "*.safetensors")))
    if not bins and not safes:
        raise ConvertError(f"{src}: no pytorch_model*.bin or *.safetensors weights")
    state: dict[str, Any] = {}
    if safes:
        from safetensors.torch import load_file

        for f in safes:
            state.update(load_file(f))
    else:
        for f in bins:
            try:  # mmap: a 7B checkpoint is paged in as needed, not read twice into memory
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # an old non-zip file cannot be mapped
                part = torch.load(f, map_location="cpu", weights_only=True)
            state.update(part)
    return state


def _map_key(key: str) -> str | None:
    """The transformers name of an original LLaVA key (None: not a known key)."""
    if key.startswith(_TOWER_IN_CKPT):
        return "model.vision_tower." + key[len(_TOWER_IN_CKPT):]
    for idx, name in (("0", "linear_1"), ("2", "linear_2")):
        prefix = f"model.mm_projector.{idx}."
        if key.startswith(prefix):
            return f"model.multi_modal_projector.{name}." + key[len(prefix):]
    if key == "lm_head.weight":
        return key
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] in ("embed_tokens", "layers", "norm"):
        return "model.language_model." + key[len("model."):]
    return None


def _short(keys: list[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _text_config(original: dict[str, Any]) -> Any:
    """The Llama config inside an original LLaVA config.json (its mm_* and training fields left out)."""
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) - {"architectures", "model_type", "_name_or_path", "transformers_version",
                                            "dtype"}
    fields = {k: v for k, v in original.items() if k in known}
    # older configs give RoPE as rope_theta / rope_scaling (newer ones fold them into rope_parameters)
    for key in ("rope_theta", "rope_scaling"):
        if original.get(key) is not None and "rope_parameters" not in fields:
            fields[key] = original[key]
    return LlamaConfig(**fields)


def _vision(clip_dir: Path) -> tuple[Any, dict[str, Any], int]:
    """The CLIP vision config and the tower's weights from a CLIPVisionModel or CLIPModel folder."""
    import torch
    from transformers import CLIPVisionModel
    from transformers.utils import logging

    # the text half of a CLIPModel folder is reported as unexpected: we check the report ourselves below
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tower, info = CLIPVisionModel.from_pretrained(clip_dir, output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConvertError(f"--vision-tower {clip_dir}: not a CLIP model folder: {e}") from e
    finally:
        logging.set_verbosity(level)
    if info["missing_keys"]:
        missing = _short(list(info["missing_keys"]))
        raise ConvertError(f"--vision-tower {clip_dir}: missing CLIP vision weights: {missing}")
    unknown = [k for k in info["unexpected_keys"] if not k.startswith(_CLIP_TEXT_HALF)]
    if unknown or info["mismatched_keys"]:
        raise ConvertError(f"--vision-tower {clip_dir}: unknown or mis-shaped keys: "
                           f"{_short(unknown + [str(m) for m in info['mismatched_keys']])}")
    text_half = len(info["unexpected_keys"])
    return tower.config, {"model.vision_tower." + k: v for k, v in tower.state_dict().items()}, text_half


def _image_processor(clip_dir: Path, pad_to_square: bool) -> Any:
    from transformers import LlavaImageProcessorPil

    cfg_path = clip_dir / "preprocessor_config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"--vision-tower {clip_dir}: no preprocessor_config.json (the tower's image preprocessing)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    kwargs = {k: cfg[k] for k in _IMAGE_PROCESSOR_FIELDS if k in cfg}
    # LLaVA-1.5 pads an image to a square of the mean colour before resizing ('image_aspect_ratio': 'pad')
    return LlavaImageProcessorPil(do_pad=pad_to_square, **kwargs)


def _new_rows(old: Any, counts: tuple[int, ...], seed: int) -> list[Any]:
    """For each count, that many rows drawn from N(mean, 1e-5 * covariance) of the old rows, as
    transformers' llava conversion draws the embeddings of the tokens it adds (the plain mean when the
    covariance is singular). The covariance is computed once for all draws."""
    import torch

    # float32 like the reference script; the 4096 x 4096 covariance of 32000 rows is the slow step on a CPU
    # (about a minute on 2 cores), so it runs on a GPU when there is one
    x = old.float().to("cuda" if torch.cuda.is_available() else "cpu")
    mu = x.mean(0)
    centred = x - mu
    sigma = (centred.T @ centred / x.shape[0]).double().cpu()
    del centred, x
    mu = mu.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    try:
        chol = torch.linalg.cholesky(1e-5 * sigma)
    except RuntimeError:  # not positive definite (fewer rows than dimensions): no spread to sample
        return [mu.expand(n, -1).to(old.dtype).clone() for n in counts]
    return [(mu + torch.randn(n, mu.shape[0], generator=gen, dtype=torch.float64) @ chol.T).to(old.dtype)
            for n in counts]


def convert(src: str | Path, vision_tower: str | Path, out: str | Path, dtype: str = "auto",
            template: str = "prometheus-vision", seed: int = 0) -> ConvertReport:
    """Convert an original LLaVA checkpoint folder (plus a CLIP folder) into a judge folder at `out`."""
    t0 = time.perf_counter()
    src, clip_dir, out = Path(src), Path(vision_tower), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():  # said before torch and transformers are imported (seconds)
        raise ConvertError(f"{src}: no config.json (not a checkpoint folder)")
    import torch
    from transformers import AddedToken, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlm_judge.card import save_card

    original = json.loads(cfg_path.read_text(encoding="utf-8"))
    if "mm_vision_tower" not in original and "LlavaLlamaForCausalLM" not in (original.get("architectures") or []):
        raise ConvertError(f"{src}: not an original LLaVA checkpoint (no mm_vision_tower, not LlavaLlamaForCausalLM)")
    for key, want in (("mm_projector_type", "mlp2x_gelu"), ("mm_patch_merge_type", "flat")):
        if original.get(key, want) != want:
            raise ConvertError(f"{src}: {key}={original[key]!r} is not supported (LLaVA-1.5 uses {want!r})")
    if original.get("mm_use_im_start_end") or original.get("mm_use_im_patch_token"):
        raise ConvertError(f"{src}: image start/end or patch tokens (mm_use_im_*) are not supported")
    select = original.get("mm_vision_select_feature", "patch")
    if select not in _SELECT:
        raise ConvertError(f"{src}: mm_vision_select_feature={select!r}; supported: {sorted(_SELECT)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} exists and is not an empty folder")
    # the tower folder is checked before gigabytes of weights are read
    if not (clip_dir / "config.json").is_file() or not (clip_dir / "preprocessor_config.json").is_file():
        raise ConvertError(f"--vision-tower {clip_dir}: not a CLIP model folder (needs config.json and "
                           f"preprocessor_config.json; the checkpoint names {original.get('mm_vision_tower')!r})")

    raw = _load_original_state_dict(src)
    mapped: dict[str, Any] = {}
    unknown: list[str] = []
    report = ConvertReport(out=str(out), tower_from="checkpoint")
    for key, tensor in raw.items():
        if key.endswith(_RECOMPUTED):
            report.skipped_recomputed += 1
            continue
        new = _map_key(key)
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = tensor
    if unknown:
        raise ConvertError(f"{src}: {len(unknown)} unknown keys (nothing is dropped silently): {_short(unknown)}")

    vision_config, clip_weights, report.clip_text_half_ignored = _vision(clip_dir)
    if not any(k.startswith("model.vision_tower.") for k in mapped):
        mapped.update(clip_weights)
        report.tower_from = str(clip_dir)
    hidden = original.get("mm_hidden_size")
    if hidden is not None and hidden != vision_config.hidden_size:
        raise ConvertError(f"{src}: mm_hidden_size={hidden} but the CLIP tower in {clip_dir} has hidden size "
                           f"{vision_config.hidden_size}: not the tower this checkpoint was trained with")

    if dtype == "auto":
        embed = mapped.get("model.language_model.embed_tokens.weight")
        target = embed.dtype if embed is not None else torch.float32
    else:
        target = getattr(torch, dtype)
    mapped = {k: (v.to(target) if v.is_floating_point() else v) for k, v in mapped.items()}

    # tokenizer: add <image> (and a pad token) as transformers' llava conversion does
    try:  # LLaVA folders ship a sentencepiece tokenizer.model
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (ImportError, OSError, ValueError) as e:
        raise ConvertError(f"{src}: cannot load its tokenizer ({e}); a tokenizer.model needs "
                           "pip install sentencepiece protobuf") from e
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = VICUNA_V1_TEMPLATE

    text_config = _text_config(original)
    old_vocab = text_config.vocab_size
    new_vocab = old_vocab if len(tokenizer) <= old_vocab else math.ceil(len(tokenizer) / 64) * 64
    grow = [k for k in ("model.language_model.embed_tokens.weight", "lm_head.weight") if k in mapped]
    if new_vocab > old_vocab and grow:
        for key in grow:
            if mapped[key].shape[0] != old_vocab:
                rows = mapped[key].shape[0]
                raise ConvertError(f"{src}: {key} has {rows} rows, config.json says vocab_size={old_vocab}")
        # both matrices get rows drawn around the embedding mean, as the reference script does
        base = mapped.get("model.language_model.embed_tokens.weight", mapped[grow[0]])
        for key, extra in zip(grow, _new_rows(base, (new_vocab - old_vocab,) * len(grow), seed)):
            mapped[key] = torch.cat([mapped[key], extra.to(mapped[key].dtype)], 0)
    text_config.vocab_size = new_vocab
    text_config.pad_token_id = tokenizer.pad_token_id
    report.vocab = (old_vocab, new_vocab)

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=_SELECT[select], projector_hidden_act="gelu",
        image_seq_length=patches + (1 if select == "cls_patch" else 0),
    )
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):  # no memory for random weights that would be overwritten
        model = LlavaForConditionalGeneration(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    if missing or extra:
        raise ConvertError(f"{src}: missing keys: {_short(missing) or 'none'}; "
                           f"unexpected keys: {_short(extra) or 'none'}")
    wrong = [f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if mapped[k].shape != v.shape]
    if wrong:
        raise ConvertError(f"{src}: tensors of the wrong shape for this config: {_short(wrong, 6)}")
    model.load_state_dict(mapped, strict=True, assign=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    report.tensors = len(mapped)
    report.image_token_id = image_token_id

    processor = LlavaProcessor(
        image_processor=_image_processor(clip_dir, original.get("image_aspect_ratio") == "pad"), tokenizer=tokenizer,
        patch_size=vision_config.patch_size, vision_feature_select_strategy=_SELECT[select],
        num_additional_image_tokens=1, chat_template=VICUNA_V1_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report.seconds = round(time.perf_counter() - t0, 2)
    save_card(out, {
        "backend": "hf", "template": template, "kind": "vision", "version": __version__,
        "converted_from": str(src), "vision_tower": report.tower_from, "dtype": str(target).replace("torch.", ""),
        "conversation": "vicuna_v1",
    })
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-judge convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="original LLaVA(-1.5) checkpoint folder (config.json with mm_* fields + weights)")
    p.add_argument("--vision-tower", required=True, metavar="CLIP_DIR",
                   help="CLIP model folder named by the checkpoint's mm_vision_tower (its config and preprocessing; "
                   "its weights unless the checkpoint stores the tower)")
    p.add_argument("--out", required=True, help="new judge folder (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight dtype of the converted folder (auto: the checkpoint's)")
    p.add_argument("--template", default="prometheus-vision", help="prompt template written to the judge card")
    p.add_argument("--seed", type=int, default=0, help="seed for the rows of the added tokens")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert(args.src, args.vision_tower, args.out, dtype=args.dtype, template=args.template,
                         seed=args.seed)
    except (ConvertError, OSError) as e:
        print(f"vlm-judge convert: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {report.out} in {report.seconds} s: {report.tensors} tensors, vision tower from "
          f"{report.tower_from}, vocabulary {report.vocab[0]} -> {report.vocab[1]} rows, <image> = id "
          f"{report.image_token_id}, {report.skipped_recomputed} recomputed buffers skipped, "
          f"{report.clip_text_half_ignored} tensors of the CLIP folder's text half not used")
    print(f"score with: vlm-judge score ROWS.jsonl --judge {report.out} --out JUDGMENTS.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["VICUNA_V1_SYSTEM", "VICUNA_V1_TEMPLATE", "ConvertError", "ConvertReport", "build_parser", "convert",
           "main"]
