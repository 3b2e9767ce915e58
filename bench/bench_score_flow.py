"""How close `vlm-judge score` gets to a server's ideal rate: fraction of ideal, old flow vs new.

    python bench/bench_score_flow.py [--rows 256] [--latency 0.5] [--spread 0.25]

A real `vlm-judge serve --judge mock` app on 127.0.0.1 holds every request for a latency drawn
uniformly from [latency - spread, latency + spread] (a fixed 0.5 s with --spread 0). Ideal rows/s
= concurrency / mean latency (one request per row: greedy, parse retries off). 'old flow' is the
same command with the backend's self-scheduling hidden, which is how the scorer ran before: batches
of --batch-size, one chunk at a time, each waiting for its slowest request. Printed for the
documented settings (concurrency 128, chunk 64 and 512) and for concurrency 32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fault_server import Fault, start_server  # noqa: E402
from vlm_judge.backends import register_backend  # noqa: E402
from vlm_judge.backends.mock import MockBackend  # noqa: E402
from vlm_judge.backends.openai import OpenAIBackend  # noqa: E402
from vlm_judge.cli import main as vlm_main  # noqa: E402


class Unscheduled:
    """The openai backend without its SchedulesItself attributes: the scorer's old flow."""

    def __init__(self, **kw: object) -> None:
        self._inner = OpenAIBackend(**kw)  # type: ignore[arg-type]
        self.name = self._inner.name

    def generate(self, prompts, params):  # noqa: ANN001, ANN201
        return self._inner.generate(prompts, params)


register_backend("openai-old-flow", "bench.bench_score_flow:Unscheduled")


def run(rows: Path, out: Path, url: str, backend: str, concurrency: int, chunk: int, batch: int) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the command's summary: not part of the table
        rc = vlm_main(["score", str(rows), "--judge", "judge", "--backend", backend, "--base-url", url, "--out", str(out),
                       "--backend-arg", f"concurrency={concurrency}", "--backend-arg", "max_retries=0",
                       "--retries", "0", "--chunk-size", str(chunk), "--batch-size", str(batch), "--no-progress"])
    dt = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"score exited {rc}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--spread", type=float, default=0.25)
    a = ap.parse_args(argv)
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="bench_flow_"))
    rubric = {"criteria": "right?", **{f"score{i}_description": f"level {i}" for i in range(1, 6)}}
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": str(k), "instruction": f"q{k}", "response": f"r{k}", "rubric": rubric}) + "\n"
                            for k in range(a.rows)))
    lat = lambda: a.latency + rng.uniform(-a.spread, a.spread)  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {a.rows} rows; latency "
          f"{a.latency:g} s +- {a.spread:g} s\n")
    print("| concurrency | chunk | batch | old flow: fraction of ideal | new flow: fraction of ideal |")
    print("|---|---|---|---|---|")
    with start_server(MockBackend("judge"), model_name="judge", max_queue=4096,
                      faults=lambda n, body: Fault(status=None, delay=lat())) as h:
        for conc, chunk, batch in ((32, 64, 8), (128, 64, 512), (128, 512, 512)):
            ideal = conc / a.latency
            fr = []
            for backend in ("openai-old-flow", "openai"):
                dt = run(rows, work / f"{backend}-{conc}-{chunk}.jsonl", h.base_url, backend, conc, chunk, batch)
                fr.append(a.rows / dt / ideal)
            print(f"| {conc} | {chunk} | {batch} | {fr[0]:.2f} | {fr[1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
