"""Two processes (torchrun, gloo on CPU): the same command that runs under `accelerate launch` on N GPUs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

RECIPE = Path(__file__).resolve().parents[1] / "train" / "recipes" / "tiny-debug.yaml"


@pytest.mark.slow
def test_two_process_data_parallel_run_and_resume(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [torchrun, "--nproc_per_node", "2", "-m", "vlm_judge.cli", "train", str(RECIPE), "--output_dir", str(out),
               "--eval_every", "0", "--save_every", "2", "--log_every", "1", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    first = run("--max_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es)" in first.stderr
    losses = json.loads((out / "train_log.json").read_text())["losses"]
    shutil.rmtree(out / "checkpoints" / "step-4")
    second = run("--max_steps", "4", "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stderr
    resumed = json.loads((out / "train_log.json").read_text())
    assert resumed["steps"] == 4 and resumed["losses"] == pytest.approx(losses[2:], abs=1e-4)
    assert json.loads((out / "vlm_judge.json").read_text())["adapter"] is True
