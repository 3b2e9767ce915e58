"""The builder streams: one pool of teacher calls across the stages (a stage's item starts as soon as
its parent is back, not when the slowest item of the stage before is), and each image file is read
once per run however many calls show it. Real server (`vlm_judge.serve`), scripted model, real files."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from perception_collection.config import BuildConfig
from perception_collection.pipeline import build
from perception_collection.rows import TeacherError
from perception_collection.teacher import ImageFiles
from tests.fault_server import Fault, start_server
from tests.pc_script import ScriptedVLM, stage_of

NAMES = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture()
def photos(tmp_path):
    from skimage import data

    d = tmp_path / "photos"
    d.mkdir()
    for name in NAMES:
        Image.fromarray(getattr(data, name)()).resize((64, 64)).save(d / f"{name}.png")
    # one image's rubric call is slow: without streaming, no response call could start before it ends
    ctx = {f"{n}.png": ("A slow one. SLOWRUBRIC" if n == "rocket" else f"A {n}.") for n in NAMES}
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": k, "context": v}) + "\n" for k, v in ctx.items()))
    return d


def _text(body: dict) -> str:
    parts = body["messages"][-1]["content"]
    return "\n".join(p.get("text", "") for p in parts) if isinstance(parts, list) else parts


def _cfg(photos: Path, url: str, out: Path, concurrency: int) -> BuildConfig:
    return BuildConfig.from_dict({
        "source": {"kind": "folder", "path": str(photos)},
        "counts": {"rubrics_per_image": 2, "instructions_per_rubric": 2},
        "teacher": {"kind": "openai", "model": "scripted-vlm", "base_url": url, "concurrency": concurrency,
                    "max_retries": 0},
        "export": ["jsonl"], "out": str(out),
    })


def test_stages_overlap_with_a_slow_teacher_and_calls_stay_within_concurrency(photos, tmp_path):
    calls: list[tuple[str, float, float]] = []  # (stage, start, planned end) as the server saw them
    lock = threading.Lock()

    def slow(n, body):
        text = _text(body)
        stage = stage_of(text)
        delay = 1.5 if stage == "rubrics" and "SLOWRUBRIC" in text else 0.05
        now = time.monotonic()
        with lock:
            calls.append((stage, now, now + delay))
        return Fault(status=None, delay=delay)

    with start_server(ScriptedVLM(), faults=slow) as srv:
        s = build(_cfg(photos, srv.base_url, tmp_path / "run", concurrency=3), progress=False)
        max_in_flight = srv.stats.max_in_flight
    assert s.counts == {"images": 4, "rubrics": 8, "instructions": 16, "responses": 80, "examples": 80, "kept": 80}
    last_rubric_end = max(end for stage, _, end in calls if stage == "rubrics")
    first_response = min(start for stage, start, _ in calls if stage == "responses")
    responses_before = sum(1 for stage, start, _ in calls if stage == "responses" and start < last_rubric_end)
    assert first_response < last_rubric_end and responses_before >= 3, (first_response, last_rubric_end)
    assert max_in_flight <= 3  # one pool across the stages, not one per stage


def test_each_image_is_read_once_per_run(photos, tmp_path):
    """Count the real file opens (audit hook) of each image made by the teacher's threads: one per
    image, while each image takes 9 teacher calls."""
    images = {str(p.resolve()) for p in photos.glob("*.png")}
    opens: dict[str, int] = {}
    active = threading.Event()

    def hook(event, args):
        if event == "open" and active.is_set() and isinstance(args[0], str):
            name = threading.current_thread().name
            path = str(Path(args[0]).resolve()) if args[0] else ""
            if path in images and (name.startswith("pc-flow") or name.startswith("vlm-judge-openai")):
                opens[path] = opens.get(path, 0) + 1

    sys.addaudithook(hook)  # (cannot be removed: the event gates it)
    model = ScriptedVLM()
    with start_server(model) as srv:
        active.set()
        try:
            s = build(_cfg(photos, srv.base_url, tmp_path / "run", concurrency=4), progress=False)
        finally:
            active.clear()
    assert s.teacher["calls"] == 9 * 4 and s.counts["kept"] == 80
    assert sum(model.calls.values()) == 36
    assert opens == {p: 1 for p in images}


def test_image_files_bound_and_changed_files(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    files = ImageFiles(max_bytes=150)  # room for one of the two
    ref, digest = files.get(str(a))
    assert ref.data == b"a" * 100 and len(digest) == 40 and files.reads == 1
    files.get(str(a))
    assert files.reads == 1  # kept
    files.get(str(b))
    files.get(str(a))
    assert files.reads == 3  # b pushed a out (the bound), so a was read again
    time.sleep(0.01)
    a.write_bytes(b"c" * 100)
    ref2, digest2 = files.get(str(a))
    assert ref2.data == b"c" * 100 and digest2 != digest  # a replaced file is read again
    with pytest.raises(TeacherError, match="cannot read image"):
        files.get(str(tmp_path / "missing.png"))
