"""GPU scorer benchmark: a LLaVA-1.5-7B-shaped judge, random bf16 weights, on one GPU.

    python bench/bench_scorer_gpu.py [--groups 64] [--batch 80] [--new-tokens 256]

Same architecture as llava-1.5-7b (CLIP ViT-L/14 at 336 px: 576 image tokens; Llama-2-7B language
model), randomly initialised on the GPU (nothing downloaded), prompts of ~700 text tokens, 256
forced feedback tokens (EOS suppressed). Prints judgments/s for our scorer with and without
shared-prefix reuse and for the naive one-request-at-a-time `generate` loop, prefill MFU against
the bf16 dense peak, and decode bandwidth against HBM bandwidth. Exits if CUDA is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dense bf16 peak FLOP/s and HBM bytes/s by device name (SXM parts; PCIe parts are lower)
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def shape(smoke: bool = False):
    """(LlavaConfig, LlavaProcessor) of LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 + a 7B Llama), or of
    a toy size with the same structure for --smoke; no weights."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from vlm_judge.tiny_models import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    vh, vl, vheads, th, tl, theads, ti, vocab = (64, 2, 4, 128, 2, 2, 384, 512) if smoke else (1024, 24, 16, 4096, 32, 32, 11008, 32064)
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl, num_attention_heads=vheads,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=vocab, hidden_size=th, intermediate_size=ti, num_hidden_layers=tl,
                       num_attention_heads=theads, num_key_value_heads=theads, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return cfg, proc


def build(device: str, smoke: bool = False):
    """The benchmark's model, randomly initialised on `device` (bf16; float32 for --smoke)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg, proc = shape(smoke)
    tok = proc.tokenizer
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.float32 if smoke else torch.bfloat16).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=64, help="(image, instruction) groups; 5 responses each")
    ap.add_argument("--per-group", type=int, default=5)
    ap.add_argument("--batch", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--naive-rows", type=int, default=8, help="rows timed for the one-at-a-time loop")
    ap.add_argument("--smoke", action="store_true", help="toy model on CPU: checks the script, measures nothing real")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 dense peak the prefill MFU is measured against (default: the device's datasheet value)")
    ap.add_argument("--json", default=None, help="also write the measures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    dev = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("bench_scorer_gpu: no CUDA device here; nothing measured")
        return 0
    from bench.bench_scorer import make_requests
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.backends.hf import HFBackend
    from vlm_judge.chat import apply
    from vlm_judge.images import load_image
    from vlm_judge.prompts import render
    from vlm_judge.scorer import Judge, ScorerConfig

    name = "CPU smoke run" if args.smoke else torch.cuda.get_device_name()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    peak_flops, peak_bw = next((v for k, v in PEAKS.items() if k in name), PEAKS["H100"])
    if args.peak_tflops:
        peak_flops = args.peak_tflops * 1e12
    model, proc = build(dev, args.smoke)
    lm_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    vis_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    reqs = make_requests(tmp, args.groups, args.per_group)
    # lengthen the shared instruction until the text is ~700 tokens (the tiny tokenizer is byte-level)
    probe = HFBackend.from_model(model, proc, name="probe")
    text_len = len(probe._encode(render(reqs[0], "prefix"))[0]) - 576
    print(f"device: {name}; LM {lm_params / 1e9:.2f}B + vision {vis_params / 1e6:.0f}M params, {model.dtype}; "
          f"{len(reqs)} judgments = {args.groups} groups x {args.per_group}; ~{text_len} text + 576 image tokens; "
          f"{args.new_tokens} forced new tokens; batch {args.batch}")
    n, new = len(reqs), args.new_tokens

    def scorer(reuse: bool, max_new: int, rows: list) -> float:
        be = HFBackend.from_model(model, proc, name="7b", prefix_reuse=reuse, min_new_tokens=max_new, batch_size=args.batch,
                                  max_batch_tokens=args.batch * 2048)
        judge = Judge(be, ScorerConfig(template="prefix", batch_size=args.batch, max_parse_retries=0,
                                       params=GenerationParams(max_new_tokens=max_new)))
        judge.grade(rows[: args.per_group * 2])
        sync()
        t = time.perf_counter()
        judge.grade(rows)
        sync()
        return time.perf_counter() - t

    def naive(rows: list) -> float:
        proc.tokenizer.padding_side = "left"
        t = time.perf_counter()
        for r in rows:
            enc = proc(text=apply(proc, render(r, "prefix")), images=[load_image(r.images[0])],
                       return_tensors="pt").to(dev)
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
        return time.perf_counter() - t

    t_on, t_off = scorer(True, new, reqs), scorer(False, new, reqs)
    p_on, p_off = scorer(True, 1, reqs), scorer(False, 1, reqs)
    t_naive = naive(reqs[: args.naive_rows]) / args.naive_rows * n

    cfg_t = model.config.text_config
    # prefill FLOPs actually computed: 2 * params per token (+ attention), vision tower per image
    seq = text_len + 576
    prefix = seq - 150  # rough: the response and feedback cue are the per-row tail
    def flops(tokens: float, ctx: float) -> float:
        return 2 * lm_params * tokens + 4 * cfg_t.num_hidden_layers * cfg_t.hidden_size * tokens * ctx  # matmuls + attention (QK and AV)
    vis = 2 * vis_params * 577
    f_off = n * (flops(seq, seq / 2) + vis)
    f_on = args.groups * (flops(prefix, prefix / 2) + vis) + n * flops(seq - prefix, seq)
    kv_row = 2 * cfg_t.num_hidden_layers * cfg_t.hidden_size * model.dtype.itemsize * (seq + new / 2)  # K and V, all layers, bf16, mean context while decoding
    rows_per_batch = min(args.batch, n)
    decode_s = {k: (t - p) / ((n / rows_per_batch) * (new - 1)) for k, (t, p) in {"on": (t_on, p_on), "off": (t_off, p_off)}.items()}

    rows: list[tuple[str, str, float]] = [
        ("judgments/s, scorer + prefix reuse ('prefix' template)", f"{n / t_on:.2f}", n / t_on),
        ("judgments/s, scorer, no prefix reuse", f"{n / t_off:.2f}", n / t_off),
        (f"judgments/s, naive one-at-a-time `generate` ({args.naive_rows} rows timed)", f"{n / t_naive:.2f}", n / t_naive),
        (f"prefill MFU, no reuse (FLOPs computed / time / {peak_flops / 1e12:.0f} TFLOP/s)", f"{f_off / p_off / peak_flops:.1%}",
         f_off / p_off / peak_flops),
        ("prefill MFU, with reuse", f"{f_on / p_on / peak_flops:.1%}", f_on / p_on / peak_flops),
        ("prefill speed-up from reuse", f"{p_off / p_on:.2f}x", p_off / p_on),
    ]
    for k, s in decode_s.items():
        bw = (all_bytes + rows_per_batch * kv_row) / s
        rows.append((f"decode step, batch {rows_per_batch}, reuse {k}: ms/step, HBM bandwidth vs {peak_bw / 1e12:.2f} TB/s",
                     f"{s * 1e3:.1f} ms, {bw / peak_bw:.0%}", bw / peak_bw))
    naive_step = t_naive / n / new
    naive_bw = (all_bytes + kv_row) / naive_step / peak_bw
    rows.append(("naive loop: ms/token, HBM bandwidth", f"{naive_step * 1e3:.1f} ms, {naive_bw:.0%}", naive_bw))
    print("\n| measure | value |\n|---|---|")
    for label, text, _ in rows:
        print(f"| {label} | {text} |")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"device": name, "judgments": n, "new_tokens": new, "batch": args.batch,
                                               "measures": [{"measure": a, "value": b, "number": c} for a, b, c in rows]},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
