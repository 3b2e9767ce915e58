"""Training throughput: our loop (train.loop.train on accelerate) vs a bare PyTorch loop.

CPU part (always): the tiny LLaVA from vlm_judge/tiny_models.py, LoRA as in the recipes, the same
real-image rows (train/debug_data.py) and batch size in both loops. Tokens/s counts non-padding
tokens (image tokens included). Our loop's time includes what it does that the bare loop does not:
encoding rows on the fly (chat template, tokenizer, image preprocessing), accelerate's wrappers,
the LR schedule and logging. The bare loop gets pre-collated batches.

GPU part (when CUDA is present): LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + a 7B Llama)
with random weights in bf16, LoRA r=16 on the language model, gradient checkpointing, a few
steps: tokens/s, peak memory and MFU against the GPU's bf16 dense peak.

    python bench/bench_train.py [--steps 30] [--repeats 3] [--gpu-steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# bf16 dense peak TFLOP/s by device name fragment (vendor datasheets, no sparsity)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_cpu(steps: int, repeats: int, batch_size: int, workdir: Path) -> dict:
    import torch

    from train.config import TrainConfig
    from train.data import RowContext, load_examples
    from train.debug_data import rows_for, sample_images, write_jsonl
    from train.encode import Encoder, collate
    from train.loop import train
    from train.model import load_base, prepare_for_training
    from vlm_judge.tiny_models import build_tiny_llava

    base = build_tiny_llava(workdir / "tiny_llava")
    imgs = sample_images(workdir / "images")
    absolute, pairs = rows_for({k: str(v) for k, v in imgs.items()})
    data = write_jsonl(absolute + pairs, workdir / "rows.jsonl")
    common = dict(base_model=str(base), train_data=[str(data)], allowed_image_dirs=[str(workdir)],
                  per_device_batch_size=batch_size, lr=1e-3, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                  precision="fp32", tensorboard=False, log_every=10_000, max_steps=steps, lr_schedule="constant")

    def ours(i: int) -> tuple[float, int]:
        res = train(TrainConfig(output_dir=str(workdir / f"ours{i}"), **common))
        return res.tokens / res.seconds, res.tokens

    def bare(i: int) -> tuple[float, int]:
        cfg = TrainConfig(output_dir=str(workdir / "bare"), **common)
        model, proc = load_base(str(base), "vision")
        enc = Encoder(proc, "vision", image_token_id=model.config.image_token_id)
        exs, _ = load_examples([data], RowContext(allowed_image_dirs=[str(workdir)]))
        encoded = [enc.encode(e) for e in exs]
        g = torch.Generator().manual_seed(i)
        batches = []
        while len(batches) < steps:
            order = torch.randperm(len(encoded), generator=g).tolist()
            batches += [collate([encoded[j] for j in order[k : k + batch_size]], proc.tokenizer.pad_token_id)
                        for k in range(0, len(order), batch_size)]
        batches = batches[:steps]
        torch.manual_seed(0)
        model = prepare_for_training(model, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        tokens = 0
        t0 = time.perf_counter()
        for b in batches:
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(b["attention_mask"].sum())
        return tokens / (time.perf_counter() - t0), tokens

    ours_tps, bare_tps = [], []
    for i in range(repeats):  # interleaved, so drifting machine load hits both loops alike
        ours_tps.append(ours(i)[0])
        bare_tps.append(bare(i)[0])
    o, b = statistics.median(ours_tps), statistics.median(bare_tps)
    return {
        "machine": f"{os.cpu_count()}-core CPU ({_cpu_name()}), torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": "tiny LLaVA (CLIP 2x32 + Llama 2x64, 16 image tokens), LoRA r=8 on the language model",
        "steps": steps, "repeats": repeats, "batch_size": batch_size,
        "ours_tokens_per_s": round(o, 1), "bare_tokens_per_s": round(b, 1), "ratio_ours_over_bare": round(o / b, 3),
        "ours_runs": [round(x, 1) for x in ours_tps], "bare_runs": [round(x, 1) for x in bare_tps],
    }


def llava_7b_config():
    """LLaVA-1.5-7B's architecture (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336px + Vicuna-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def toy_llava_config():
    """The 7B shape's structure at toy size, for --gpu-smoke."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=500,
                       vision_feature_select_strategy="default", vision_feature_layer=-2)


def bench_gpu(steps: int, batch_size: int, text_tokens: int, device: str = "cuda", cfg=None) -> dict:
    """A few LoRA steps of the 7B vision recipe's architecture, random weights, bf16.
    (`device`/`cfg` let the code path be checked on CPU with a small config.)"""
    import torch
    from transformers import LlavaForConditionalGeneration

    from train.config import TrainConfig
    from train.model import prepare_for_training

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    cfg = cfg or llava_7b_config()
    vc, tc = cfg.vision_config, cfg.text_config
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = LlavaForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    tcfg = TrainConfig(base_model="random-llava-1.5-7b", lora_r=16, lora_alpha=32, gradient_checkpointing=True)
    model = prepare_for_training(model, tcfg)
    model.train()
    n_img = (vc.image_size // vc.patch_size) ** 2  # 576 for 336/14; CLS dropped
    seq = n_img + text_tokens
    ids = torch.randint(3, min(32000, tc.vocab_size - 1), (batch_size, seq), device=dev)
    ids[:, 1 : 1 + n_img] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_img + text_tokens // 2] = -100  # loss on the second half of the text only
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(batch_size, 3, vc.image_size, vc.image_size, device=dev, dtype=torch.bfloat16)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (kernels, allocator)
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    lm = model.base_model.model.model.language_model
    vt = model.base_model.model.model.vision_tower
    L, H = tc.num_hidden_layers, tc.hidden_size
    # language model weights + lm_head (the embedding table is a lookup, not matmul FLOPs)
    n_lm = sum(p.numel() for n, p in lm.named_parameters() if "lora_" not in n and "embed_tokens" not in n) + tc.vocab_size * H
    n_vt = sum(p.numel() for p in vt.parameters())
    n_pos = n_img + 1
    tokens = batch_size * seq
    # model FLOPs: 6N per token for the language model (fwd + bwd) + attention (6*L*H*seq per token,
    # fwd + bwd, causal masking not discounted), and a forward pass of the frozen vision tower over
    # 577 positions per image (no backward reaches it). Checkpointing's recompute is not counted.
    flops = 6 * n_lm * tokens + 6 * L * H * seq * tokens + 2 * n_vt * n_pos * batch_size
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {
        "device": name, "torch": torch.__version__, "batch_size": batch_size, "seq_len": seq, "steps": steps,
        "seconds_per_step": round(dt, 3), "tokens_per_s": round(tokens / dt, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "tflops_per_s": round(flops / dt / 1e12, 1),
        "mfu": round(flops / dt / (peak * 1e12), 3) if peak else None, "bf16_peak_tflops": peak,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gpu-steps", type=int, default=6)
    ap.add_argument("--gpu-batch-size", type=int, default=4)
    ap.add_argument("--gpu-text-tokens", type=int, default=1024)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gpu-smoke", action="store_true",
                    help="run the GPU part's code on the CPU with a toy LLaVA (checks the script, measures nothing real)")
    a = ap.parse_args(argv)
    logging.getLogger("vlm_judge.train").setLevel(logging.WARNING)
    import torch

    out: dict = {}
    if not a.skip_cpu:
        with tempfile.TemporaryDirectory() as d:
            out["cpu"] = bench_cpu(a.steps, a.repeats, a.batch_size, Path(d))
        print(json.dumps(out["cpu"], indent=1))
    if a.gpu_smoke:
        out["gpu"] = bench_gpu(a.gpu_steps, 1, 32, device="cpu", cfg=toy_llava_config())
        print(json.dumps(out["gpu"], indent=1))
    elif torch.cuda.is_available():
        out["gpu"] = bench_gpu(a.gpu_steps, a.gpu_batch_size, a.gpu_text_tokens)
        print(json.dumps(out["gpu"], indent=1))
    else:
        out["gpu"] = "no CUDA device: GPU part not run"
        print(out["gpu"])
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
