"""Gather the parts of bench/gpu_check.sh into one JSON and one Markdown table.

    python bench/gpu_report.py OUT_DIR     # reads env/scorer/train/vllm .json there
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    parts = {name: _load(out / f"{name}.json") for name in ("env", "scorer", "train", "vllm")}
    (out / "gpu_check.json").write_text(json.dumps(parts, indent=1))
    env = parts["env"] or {}
    lines = [f"Machine: {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}",
             "", "| part | measure | value |", "|---|---|---|"]
    scorer = parts["scorer"]
    if isinstance(scorer, dict):
        lines += [f"| scorer (7B shape, {scorer['judgments']} judgments) | {m['measure']} | {m['value']} |" for m in scorer["measures"]]
    else:
        lines.append("| scorer | - | not run (see scorer.log) |")
    train = parts["train"]
    gpu = train.get("gpu") if isinstance(train, dict) else None
    if isinstance(gpu, dict):
        for k in ("tokens_per_s", "seconds_per_step", "peak_memory_gib", "tflops_per_s", "mfu"):
            lines.append(f"| train LoRA (7B shape, batch {gpu['batch_size']} x {gpu['seq_len']}) | {k} | {gpu[k]} |")
    else:
        lines.append(f"| train | - | {gpu or 'not run (see train.log)'} |")
    vllm = parts["vllm"]
    if isinstance(vllm, dict):
        lines.append(f"| vLLM offline (same shape) | judgments/s | {vllm['judgments_per_s']} |")
    else:
        lines.append("| vLLM offline | - | not run: vLLM not installed there (see vllm.log) |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
