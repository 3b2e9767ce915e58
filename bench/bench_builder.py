"""Data builder benchmark: calls/s against a teacher with a fixed latency, and CPU per call.

    python bench/bench_builder.py                       # latency 0.5 s, concurrency 1 4 16 64
    python bench/bench_builder.py --baseline 6830a01    # also that commit's builder (git archive), same runs
    python bench/bench_builder.py --profile             # cProfile of the builder's calls (instant teacher)

The teacher is the scripted model of the tests (tests/pc_script.py) behind the real
`vlm_judge.serve` server, run in a child process so that its CPU is not the builder's. Each call
sleeps `--latency` seconds on the server, then answers at once. Every image costs 9 calls
(1 rubric call, 2 rewordings, 2 instruction calls, 4 response calls).

Ideal calls/s: the calls of a run divided by the shortest time a perfect scheduler could take,
L * max(ceil(calls / concurrency), chain), where chain = 5 is the longest chain of calls that must
follow each other (rubrics -> reword r0 -> reword r1 -> instructions -> responses; the rewordings
of one image run one after the other, as the stage does). The achieved rate is calls divided by
the time from the first call's start to the last call's end, measured in the builder.

CPU per call: an instantly answering teacher, `time.process_time()` of the builder process over a
whole build (sources, stages, exports) divided by its calls, and per extra call (16 -> 48 images).
Each run also prints the mean call time, how busy the pool's slots were, and the calls in flight
per tenth of the run (where it ran short of work).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALLS_PER_IMAGE = 9
CHAIN = 5
IMAGE_SIZE = 512
"""Side of the square JPEG test images (set by --image-size)."""


# ---- the teacher server (child process) ------------------------------------------------------


def serve(latency: float) -> None:
    """Serve the scripted model, each call delayed by `latency`; print the base URL, run until stdin closes."""
    sys.path.insert(0, str(ROOT))
    from tests.fault_server import Fault, start_server
    from tests.pc_script import ScriptedVLM

    faults = (lambda n, body: Fault(status=None, delay=latency)) if latency > 0 else None
    with start_server(ScriptedVLM(), faults=faults, max_batch=64, batch_wait=0.0) as srv:
        print(srv.base_url, flush=True)
        sys.stdin.read()


class TeacherServer:
    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(latency)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.base_url = self.proc.stdout.readline().strip()  # type: ignore[union-attr]

    def __enter__(self) -> TeacherServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(10)


# ---- one build (runs with whichever builder is first on sys.path) ----------------------------


def make_images(folder: Path, n: int, size: int = 512) -> None:
    """n distinct JPEG photos (skimage's, shifted per index): about 50-90 KB each at 512 px."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    base = [Image.fromarray(getattr(data, k)()).convert("RGB").resize((size, size))
            for k in ("astronaut", "chelsea", "coffee", "rocket")]
    for i in range(n):
        arr = np.roll(np.asarray(base[i % 4]), i, axis=1)
        Image.fromarray(arr).save(folder / f"img{i:03d}.jpg", quality=90)


class Timed:
    """A backend wrapper that records each call's (start, end) in the builder's clock."""

    def __init__(self, inner) -> None:
        self.inner, self.spans, self._lock = inner, [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, params):
        t0 = time.monotonic()
        out = self.inner.generate(prompts, params)
        with self._lock:
            self.spans.append((t0, time.monotonic()))
        return out


def one_build(base_url: str, images: int, concurrency: int, work: Path, profile: bool = False,
              size: int = 512) -> dict:
    # the builder is whichever is first on PYTHONPATH (this tree, or the --baseline one)
    from perception_collection.config import BuildConfig
    from perception_collection.pipeline import build
    from perception_collection.teacher import make_teacher

    folder = work / "images"
    if not folder.is_dir():
        make_images(folder, images, size)
    out = work / f"run-{concurrency}-{time.monotonic_ns()}"
    cfg = BuildConfig.from_dict({
        "source": {"kind": "folder", "path": str(folder)},
        "counts": {"rubrics_per_image": 2, "instructions_per_rubric": 2},
        "teacher": {"kind": "openai", "model": "scripted-vlm", "base_url": base_url, "concurrency": concurrency,
                    "max_retries": 0},
        "export": ["jsonl"], "out": str(out),
    })
    teacher = make_teacher(cfg, out)
    timed = teacher.backend = Timed(teacher.backend)
    prof = None
    cpu0, t0 = time.process_time(), time.monotonic()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        _profile_threads(prof)
    s = build(cfg, progress=False, teacher=teacher)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    teacher.close()
    if prof is not None:
        _stop_profile(prof)
    calls = len(timed.spans)
    window = max(e for _, e in timed.spans) - min(b for b, _ in timed.spans)
    busy = sum(e - b for b, e in timed.spans)
    t_first = min(b for b, _ in timed.spans)
    return {"calls": calls, "errors": s.teacher.get("errors", 0), "window_s": window, "wall_s": wall, "cpu_s": cpu, "kept": s.counts["kept"],
            "mean_call_s": busy / calls, "occupancy": busy / (window * concurrency),
            # calls in flight per tenth of the window: where the pool ran short of work
            "profile": [round(sum(min(e, t_first + (k + 1) * window / 10) - max(b, t_first + k * window / 10)
                                  for b, e in timed.spans if e > t_first + k * window / 10
                                  and b < t_first + (k + 1) * window / 10) / (window / 10), 1) for k in range(10)]}


# cProfile profiles only the thread that enables it: one profiler per worker thread, merged at the end
_profilers: list = []


def _profile_threads(main_prof) -> None:
    import cProfile

    def start(*_a):
        p = cProfile.Profile()
        _profilers.append(p)
        p.enable()

    _profilers.append(main_prof)
    main_prof.enable()
    threading.setprofile(start)


def _stop_profile(main_prof) -> None:
    import pstats

    threading.setprofile(None)
    for p in _profilers:
        p.disable()
    st = pstats.Stats(_profilers[0])
    for p in _profilers[1:]:
        try:
            st.add(p)
        except TypeError:  # a profiler that never ran
            pass
    st.dump_stats(os.environ.get("BENCH_PROFILE_OUT", "builder.prof"))
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(60)


def child_build() -> None:
    """`--child`: one build in this process, with whatever builder is first on PYTHONPATH; JSON on stdout."""
    a = json.loads(sys.argv[2])
    r = one_build(a["base_url"], a["images"], a["concurrency"], Path(a["work"]), a.get("profile", False),
                  a.get("size", 512))
    print("RESULT " + json.dumps(r), flush=True)


def run_build(base_url: str, images: int, concurrency: int, work: Path, pythonpath: Path = ROOT,
              profile: bool = False) -> dict:
    arg = json.dumps({"base_url": base_url, "images": images, "concurrency": concurrency, "work": str(work),
                      "profile": profile, "size": IMAGE_SIZE})
    p = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(pythonpath)}, cwd=str(pythonpath))
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    if profile:
        print(p.stdout)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def export_tree(ref: str, dest: Path) -> Path:
    """The repository at `ref` (git archive) for the baseline builder."""
    dest.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    (dest / "bench").mkdir(exist_ok=True)
    return dest


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(float(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_build()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency", type=float, default=0.5, help="seconds the teacher takes per call")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--images", type=int, default=0,
                    help="images per run (default: max(16, 2 x concurrency): 144 calls or more)")
    ap.add_argument("--cpu-images", type=int, default=16, help="images of the instant-teacher CPU runs")
    ap.add_argument("--baseline", default=None, help="a git ref whose builder is measured too (e.g. 6830a01)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one instant-teacher build and stop")
    ap.add_argument("--skip-latency", action="store_true", help="only the CPU per call")
    ap.add_argument("--skip-cpu", action="store_true", help="only the fixed-latency runs")
    ap.add_argument("--image-size", type=int, default=512, help="side of the square JPEG images in pixels")
    a = ap.parse_args()
    global IMAGE_SIZE
    IMAGE_SIZE = a.image_size

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start; images {IMAGE_SIZE} px JPEG")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        with TeacherServer(0.0) as srv:
            if a.profile:
                run_build(srv.base_url, a.cpu_images, 1, tmp_p / "prof", profile=True)
                return 0
            trees = [("this tree", ROOT)]
            if a.baseline:
                trees.insert(0, (a.baseline, export_tree(a.baseline, tmp_p / "baseline")))
            big = 3 * a.cpu_images
            print(f"\ninstant teacher, concurrency 1: builder CPU per call over a whole build ({a.cpu_images} images), "
                  f"per extra call ({a.cpu_images} -> {big} images), and the calls/s client + server manage at "
                  f"concurrency 64 ({big} images)")
            for name, tree in [] if a.skip_cpu else trees:
                run_build(srv.base_url, a.cpu_images, 1, tmp_p / "cpu", tree)  # (warm caches)
                small = min((run_build(srv.base_url, a.cpu_images, 1, tmp_p / "cpu", tree) for _ in range(2)),
                            key=lambda x: x["cpu_s"])
                large = min((run_build(srv.base_url, big, 1, tmp_p / "cpu-big", tree) for _ in range(2)),
                            key=lambda x: x["cpu_s"])
                marginal = (large["cpu_s"] - small["cpu_s"]) / (large["calls"] - small["calls"])
                cap = run_build(srv.base_url, big, 64, tmp_p / "cpu-big", tree)
                print(f"  {name:<12} {1000 * small['cpu_s'] / small['calls']:5.1f} ms/call over {small['calls']} calls "
                      f"(wall {small['wall_s']:.2f} s), {1000 * marginal:5.1f} ms per extra call, "
                      f"{cap['calls'] / cap['window_s']:6.1f} calls/s at concurrency 64 (best of 2 each)", flush=True)
        if a.skip_latency:
            return 0
        print(f"\nteacher latency {a.latency:g} s per call")
        print("  builder       conc  images  calls   achieved/s   ideal/s   fraction   wall s   CPU ms/call")
        with TeacherServer(a.latency) as srv:
            for c in a.concurrency:
                for name, tree in trees:
                    n = a.images or max(16, 2 * c)
                    r = run_build(srv.base_url, n, c, tmp_p / f"lat-{n}", tree)
                    calls = r["calls"]
                    ideal = calls / (a.latency * max(math.ceil(calls / c), CHAIN))
                    got = calls / r["window_s"]
                    print(f"  {name:<12} {c:>4}  {n:>6}  {calls:>5}   {got:>10.2f}   {ideal:>7.2f}   {got / ideal:>8.3f}   "
                          f"{r['wall_s']:>6.2f}   {1000 * r['cpu_s'] / calls:>6.1f}", flush=True)
                    print(f"      failed calls {r['errors']}, mean call {r['mean_call_s']:.3f} s, slots busy {r['occupancy']:.3f}, "
                          f"calls in flight by tenth of the run {r['profile']}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
