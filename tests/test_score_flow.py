"""Requests keep flowing: chunking for saving must not cap how many requests a server sees at once,
and a chunk's slowest request must not hold back the next one. Real server on 127.0.0.1 with a
fixed delay per request; what is asserted is how many requests overlapped, not how long it took."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.fault_server import Fault, start_server
from vlm_judge.backends.mock import MockBackend
from vlm_judge.cli import main as vlm_main

DELAY = 0.3
RUBRIC = {"criteria": "Is it right?", "score1_description": "no", "score2_description": "barely",
          "score3_description": "partly", "score4_description": "mostly", "score5_description": "yes"}


class Overlap:
    """Counts requests in flight at the server: each is held `delay` seconds by the fault layer."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.starts: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, n: int, body: dict) -> Fault:
        with self.lock:
            self.starts.append(time.monotonic())
        return Fault(status=None, delay=self.delay)

    def most_at_once(self) -> int:
        """The most requests that started within one delay of each other (all of them in flight)."""
        s = sorted(self.starts)
        return max(sum(1 for t in s[i:] if t - s[i] < self.delay * 0.8) for i in range(len(s)))


def _rows(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": str(k), "instruction": f"What is {k}+1?", "response": str(k + 1),
                                        "rubric": RUBRIC}) + "\n" for k in range(n)))
    return path


def test_small_chunks_do_not_cap_the_requests_a_server_sees(tmp_path, capsys):
    load = Overlap(DELAY)
    with start_server(MockBackend("judge"), model_name="judge", faults=load) as h:
        rc = vlm_main(["score", str(_rows(tmp_path / "rows.jsonl", 48)), "--judge", "judge", "--base-url", h.base_url,
                       "--out", str(tmp_path / "out.jsonl"), "--chunk-size", "4", "--backend-arg", "concurrency=16",
                       "--retries", "0"])
    assert rc == 0, capsys.readouterr().err
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [str(k) for k in range(48)] and all(r["status"] == "ok" for r in out)
    # chunks of 4 used to mean at most 4 requests in flight; now the backend's concurrency is reached
    assert load.most_at_once() >= 12, load.most_at_once()
    err = capsys.readouterr().err
    assert "48/48" in err  # the bar has a total


def test_the_scorer_hands_a_server_backend_every_pending_prompt(tmp_path):
    """--batch-size is for in-process judges: a server backend gets the whole chunk in one call."""
    load = Overlap(DELAY)
    with start_server(MockBackend("judge"), model_name="judge", faults=load) as h:
        rc = vlm_main(["score", str(_rows(tmp_path / "rows.jsonl", 24)), "--judge", "judge", "--base-url", h.base_url,
                       "--out", str(tmp_path / "out.jsonl"), "--batch-size", "2", "--chunk-size", "24",
                       "--backend-arg", "concurrency=24", "--retries", "0", "--no-progress"])
    assert rc == 0
    assert load.most_at_once() >= 18, load.most_at_once()


def test_grade_chunks_runs_in_process_judges_one_chunk_at_a_time_and_in_order():
    from vlm_judge.records import JudgeRequest, Rubric
    from vlm_judge.scorer import Judge

    rubric = Rubric.from_dict(RUBRIC)
    chunks = [[JudgeRequest(instruction="q", response=f"r{k}", rubric=rubric, id=f"{c}-{k}") for k in range(3)]
              for c in range(4)]
    done: list[int] = []
    got = list(Judge(MockBackend("m")).grade_chunks(chunks, progress=done.append))
    assert [c for c, _ in got] == chunks and all(len(j) == 3 for _, j in got)
    assert sum(done) == 12
