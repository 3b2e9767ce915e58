"""vLLM's offline engine on the scorer benchmark's shape: the ceiling our backends are compared to.

    python bench/bench_vllm_offline.py [--smoke] [--groups 64] [--new-tokens 256] [--json out.json]

The LLaVA-1.5-7B shape of bench_scorer_gpu.py (CLIP ViT-L/14-336, a 7B Llama) with vLLM's
`load_format="dummy"` (random weights, nothing read or downloaded), the same rendered prompts and
images, exactly `--new-tokens` new tokens per judgment (EOS ignored), prefix caching on. Prints
judgments/s. `--smoke` uses a toy shape so that the script can be checked with vLLM's CPU build.
Exits 0 with a message when vLLM is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def save_shape(folder: Path, smoke: bool) -> Path:
    """config.json + processor of bench_scorer_gpu's shape (no weights: vLLM makes dummy ones)."""
    from bench.bench_scorer_gpu import shape

    cfg, proc = shape(smoke)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.torch_dtype = "float32" if smoke else "bfloat16"
    cfg.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--per-group", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="toy shape (vLLM's CPU build can run it)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        print(f"bench_vllm_offline: vLLM is not installed here ({e}); nothing measured")
        return 0
    from transformers import AutoProcessor

    from bench.bench_scorer import make_requests
    from vlm_judge import chat
    from vlm_judge.images import load_image
    from vlm_judge.prompts import render

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    folder = save_shape(tmp / "model", args.smoke)
    proc = AutoProcessor.from_pretrained(folder)
    reqs = make_requests(tmp, args.groups, args.per_group)
    inputs = []
    for r in reqs:
        # the layout the scorer's backends use, so vLLM is given the same text as ours
        text = chat.apply(proc, render(r, "prefix"))
        inputs.append({"prompt": text, "multi_modal_data": {"image": [load_image(r.images[0])]}})
    llm = LLM(model=str(folder), load_format="dummy", enable_prefix_caching=True, max_model_len=4096,
              limit_mm_per_prompt={"image": 1}, **({"dtype": "float32"} if args.smoke else {}))
    sp = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
    llm.generate(inputs[: args.per_group * 2], sp, use_tqdm=False)  # warm-up (graphs, allocator)
    t = time.perf_counter()
    llm.generate(inputs, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    out = {"engine": "vllm offline LLM.generate", "judgments": len(inputs), "new_tokens": args.new_tokens,
           "seconds": round(dt, 2), "judgments_per_s": round(len(inputs) / dt, 3)}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
