#!/usr/bin/env bash
# The one prepared GPU check: runs in one go (under 8 minutes on an H100/H200) and writes
# $OUT/gpu_check.json and $OUT/gpu_check.md (a table for BENCHMARKS.md).
#
#   bash bench/gpu_check.sh            # on the GPU machine (torch, transformers, peft, accelerate there)
#   bash bench/gpu_check.sh --smoke    # the same code paths on a CPU, toy sizes: checks the script only
#
# Parts: (1) bench_scorer_gpu.py: LLaVA-1.5-7B shape, random bf16, judgments/s with and without
# prefix reuse, prefill MFU against 790 TFLOP/s, decode bandwidth against HBM; (2) the GPU part of
# bench_train.py: LoRA on the 7B shape, tokens/s, peak memory, MFU; (3) vLLM offline on the same
# shape, only when vLLM imports there (its CUDA wheels are several hundred MB, more than one device
# call may carry, so on the lent machine this part says "not installed" unless the image has vLLM).
# Each part has its own time limit, so one slow part cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE=1
if [ -n "$SMOKE" ]; then
  scorer_args=(--smoke --groups 2 --per-group 2 --batch 4 --new-tokens 4 --naive-rows 1)
  train_args=(--skip-cpu --gpu-smoke --gpu-steps 1)
  vllm_args=(--smoke --groups 2 --per-group 2 --new-tokens 4)
else
  scorer_args=(--groups 64 --per-group 5 --batch 80 --new-tokens 256 --naive-rows 8 --peak-tflops 790)
  train_args=(--skip-cpu --gpu-steps 6)
  vllm_args=(--groups 64 --per-group 5 --new-tokens 256)
fi
$PY - <<'PY' > "$OUT/env.json"
import json, platform, torch, transformers
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
PY
status=0
timeout 240 $PY bench/bench_scorer_gpu.py "${scorer_args[@]}" --json "$OUT/scorer.json" 2>&1 | tee "$OUT/scorer.log" || status=1
timeout 180 $PY bench/bench_train.py "${train_args[@]}" --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log" || status=1
timeout 150 $PY bench/bench_vllm_offline.py "${vllm_args[@]}" --json "$OUT/vllm.json" 2>&1 | tee "$OUT/vllm.log" || status=1
$PY bench/gpu_report.py "$OUT" || status=1
exit $status
