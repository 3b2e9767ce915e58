"""Load figures of `vlm-judge serve`: the uvicorn/starlette server against the old http.server one.

Both serve the same backend (the mock judge plus a fixed sleep per backend call, standing in for
a model's batched generate) in their own subprocess, under the same load in the same run:

- steady: CLIENTS keep-alive clients, each sending REQUESTS chat requests back to back;
  requests/s, p50/p95 latency, and the server's RSS (now and peak) after the load;
- burst: BURST clients connect at the same moment with one request each; how many got an answer
  (200, or 429 with Retry-After) and how many a connection error (reset or refused).

The old server is the vlm_judge/serve.py of commit 6830a01, read with `git show` into a temp
module (it needs only the standard library and vlm_judge's core).

    python bench/bench_serve.py [--clients 32] [--requests 100] [--burst 200] [--delay-ms 5]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "6830a01"


def _serve_child(which: str, port: int, delay: float) -> None:
    """Runs in the server subprocess: serve a sleepy mock until killed."""
    sys.path.insert(0, str(REPO))
    from vlm_judge.backends.mock import MockBackend

    class Sleepy(MockBackend):
        def generate(self, prompts, params):
            time.sleep(delay)
            return super().generate(prompts, params)

    backend = Sleepy("mock")
    if which == "old":
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:vlm_judge/serve.py"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "old_serve.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("old_serve", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["old_serve"] = mod
        spec.loader.exec_module(mod)
        mod.start_server(backend, port=port, max_batch=16, batch_wait=0.005)
    else:
        from vlm_judge.serve import start_server

        start_server(backend, port=port, max_batch=16, batch_wait=0.005, max_queue=256)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(i: int) -> bytes:
    return json.dumps({"model": "mock", "max_tokens": 64,
                       "messages": [{"role": "user", "content": f"Grade response {i} against the rubric."}]}).encode()


def _steady(port: int, clients: int, requests: int) -> dict:
    lat: list[float] = []
    errors = []
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for k in range(requests):
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body=_body(c * requests + k),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
            except (OSError, http.client.HTTPException) as e:
                errors.append(type(e).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "errors": len(errors), "rps": len(lat) / wall,
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else None}


def _burst(port: int, n: int) -> dict:
    results: list = []
    lock = threading.Lock()
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        gate.wait()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=_body(i), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            out = "answered" if r.status == 200 or (r.status == 429 and r.getheader("Retry-After")) else f"http {r.status}"
            conn.close()
        except (OSError, http.client.HTTPException):
            out = "connection error"
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {k: results.count(k) for k in sorted(set(results))}


def _rss(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def run_one(which: str, args: argparse.Namespace) -> dict:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--child", which, "--port", str(port),
                             "--delay-ms", str(args.delay_ms)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        rss0 = _rss(proc.pid)[0]
        steady = _steady(port, args.clients, args.requests)
        rss, peak = _rss(proc.pid)
        burst = _burst(port, args.burst)
    finally:
        proc.kill()
        proc.wait()
    return {"server": which, **steady, "rss_idle_mib": rss0, "rss_mib": rss, "rss_peak_mib": peak, "burst": burst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=100, help="per client")
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, default=5.0, help="sleep per backend call (a model's batched generate)")
    ap.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _serve_child(args.child, args.port, args.delay_ms / 1000)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}")
    print(f"load: {args.clients} keep-alive clients x {args.requests} requests; burst of {args.burst}; "
          f"backend sleeps {args.delay_ms:g} ms per call")
    rows = [run_one(which, args) for which in ("old", "new")]
    print("| server | requests/s | p50 ms | p95 ms | errors | RSS idle / after / peak MiB | burst |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        burst = ", ".join(f"{v} {k}" for k, v in r["burst"].items())
        print(f"| {r['server']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['errors']} | "
              f"{r['rss_idle_mib']:.0f} / {r['rss_mib']:.0f} / {r['rss_peak_mib']:.0f} | {burst} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
