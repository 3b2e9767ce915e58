"""Scorer benchmark: ratios measured in one run on a small random LLaVA on CPU.

    python bench/bench_scorer.py            # about two minutes on 2 CPU cores

The model has LLaVA-1.5's image geometry (336 px, 14 px patches: 576 image tokens per image) and
a small language model so that it runs on a CPU. Feedback length is forced (EOS suppressed for
`--new-tokens` tokens) so that every side generates exactly the same number of tokens.

Prints (1) our batched scorer vs a bare batched `model.generate` loop on the same model, prompts
and batch size; (2) with vs without shared-prefix reuse, 5 responses per (image, instruction)
group, 'prefix' template; (3) rows/s vs batch size.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random LLaVA: CLIP tower at 336/14 (576 image tokens), Llama LM of the given size."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlm_judge.tiny_models import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def make_requests(img_dir: Path, groups: int, per_group: int) -> list:
    """`groups` (image, instruction, rubric) triples with `per_group` different responses each."""
    from PIL import Image
    from skimage import data

    from vlm_judge.records import ImageRef, JudgeRequest, Rubric

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "moon", "page"]
    rubric = Rubric(
        criteria="Is the description faithful to the photo: objects, colours, counts and their positions?",
        score_descriptions=(
            "The description contradicts the photo or names objects that are not there.",
            "Several details are wrong or invented; the main subject is barely right.",
            "The main subject is right, but colours, counts or positions are often wrong.",
            "Nearly everything is right; one minor detail is missing or imprecise.",
            "Every stated detail matches the photo and nothing important is left out.",
        ),
    )
    reqs = []
    for g in range(groups):
        name = names[g % len(names)]
        p = img_dir / f"{name}_{g}.png"
        arr = getattr(data, name)()
        Image.fromarray(arr).convert("RGB").resize((400, 360)).save(p)
        for k in range(per_group):
            reqs.append(JudgeRequest(
                instruction=f"Describe photo {g} in detail: what is in it, where, and what colours do you see?",
                response=f"Answer {k}. " + "The photo shows a subject in the centre with some background. " * (2 + k),
                reference_answer="A detailed and correct description of the photo, naming every visible object.",
                rubric=rubric, images=(ImageRef(path=str(p)),), id=f"{g}-{k}",
            ))
    return reqs


def scorer_runner(model_dir: Path, reqs: list, template: str, reuse: bool, batch: int, new: int) -> Callable[[], None]:
    """A warmed-up closure that grades all requests with our scorer and hf backend."""
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.backends.hf import HFBackend
    from vlm_judge.scorer import Judge, ScorerConfig

    be = HFBackend(str(model_dir), prefix_reuse=reuse, min_new_tokens=new, batch_size=batch)
    cfg = ScorerConfig(template=template, batch_size=batch, max_parse_retries=0,
                       params=GenerationParams(max_new_tokens=new))
    judge = Judge(be, cfg)
    judge.grade(reqs[: min(len(reqs), batch)])  # warm up (allocator, kernels)

    def run() -> None:
        be._image_cache.clear()  # count image preprocessing in every run, as the bare loop does
        out = judge.grade(reqs)
        bad = [j.reason for j in out if j.status == "error"]
        assert not bad, bad[:2]

    return run


def bare_runner(model_dir: Path, reqs: list, template: str, batch: int, new: int) -> Callable[[], None]:
    """The baseline a user would write: processor + model.generate over batches of `batch` rows."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_judge.chat import apply
    from vlm_judge.images import load_image
    from vlm_judge.prompts import render

    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()

    def texts(rs: list) -> list[str]:
        out = []
        for r in rs:
            out.append(apply(proc, render(r, template)))
        return out

    def run(rs: list = reqs) -> None:
        for s in range(0, len(rs), batch):
            chunk = rs[s : s + batch]
            enc = proc(text=texts(chunk), images=[load_image(r.images[0]) for r in chunk], padding=True,
                       return_tensors="pt")
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    run(reqs[:batch])
    return run


def best_of(runners: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Fastest of `reps` timings each, the runners interleaved so machine load hits all alike."""
    best = {k: float("inf") for k in runners}
    for _ in range(reps):
        for k, fn in runners.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--per-group", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--batch-sizes", default="1,5,10")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scorer_"))
    model_dir = build_model(tmp / "model", args.hidden, args.layers)
    reqs = make_requests(tmp, args.groups, args.per_group)
    n, new, b = len(reqs), args.new_tokens, args.batch
    from vlm_judge.backends.hf import HFBackend
    from vlm_judge.prompts import render

    be = HFBackend(str(model_dir))
    lens = [len(be._encode(render(r, "prefix"))[0]) for r in reqs]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
          f"torch {torch.__version__}, cuda {torch.cuda.is_available()}")
    print(f"model: random LLaVA, CLIP 336/14 (576 image tokens), Llama hidden {args.hidden} x {args.layers} layers; "
          f"{n} rows = {args.groups} groups x {args.per_group} responses; prompt {min(lens)}-{max(lens)} tokens; "
          f"{new} forced new tokens; batch {b}")

    t = best_of({
        "bare": bare_runner(model_dir, reqs, "default", b, new),
        "ours": scorer_runner(model_dir, reqs, "default", False, b, new),
        "ours_reuse": scorer_runner(model_dir, reqs, "default", True, b, new),
        "off": scorer_runner(model_dir, reqs, "prefix", False, b, new),
        "on": scorer_runner(model_dir, reqs, "prefix", True, b, new),
    }, args.reps)
    t1 = best_of({"off": scorer_runner(model_dir, reqs, "prefix", False, b, 1),
                  "on": scorer_runner(model_dir, reqs, "prefix", True, b, 1)}, args.reps)
    rows = [
        ("(1) scorer, prefix reuse off, vs bare `generate` ('default' template)", t["bare"] / t["ours"],
         f"{n / t['ours']:.2f} vs {n / t['bare']:.2f} rows/s"),
        ("(1b) scorer, prefix reuse on, vs bare `generate` ('default' template)", t["bare"] / t["ours_reuse"],
         f"{n / t['ours_reuse']:.2f} vs {n / t['bare']:.2f} rows/s"),
        (f"(2) prefix reuse on vs off ('prefix' template, {new} new tokens)", t["off"] / t["on"],
         f"{n / t['off']:.2f} -> {n / t['on']:.2f} rows/s"),
        ("(2b) prefix reuse on vs off ('prefix' template, prompt only: 1 new token)", t1["off"] / t1["on"],
         f"{n / t1['off']:.2f} -> {n / t1['on']:.2f} rows/s"),
    ]
    print(f"\n| measure (best of {args.reps}, interleaved) | ratio | detail |\n|---|---|---|")
    for name, ratio, detail in rows:
        print(f"| {name} | {ratio:.2f}x | {detail} |")
    print(f"\n(3) rows/s vs batch size ('prefix' template, reuse on, {new} new tokens)\n\n| batch | rows/s |\n|---|---|")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    tb = best_of({str(bs): scorer_runner(model_dir, reqs, "prefix", True, bs, new) for bs in sizes}, args.reps)
    for bs in sizes:
        print(f"| {bs} | {n / tb[str(bs)]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
