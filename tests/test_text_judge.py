"""text_judge: the caption bridge, captioners, TextJudge and Perception -> Feedback Collection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.samples import PROMETHEUS_VISION
from text_judge import BackendCaptioner, TextJudge, bridge_instruction, caption_bridge, perception_to_feedback
from text_judge.judge import REFUSED
from vlm_judge.backends import get_backend
from vlm_judge.backends.mock import MockBackend
from vlm_judge.inputs import InputOptions, read_requests
from vlm_judge.prompts import render
from vlm_judge.records import ImageRef, JudgeRequest, Rubric

RUBRIC = Rubric("Is the answer right about the photo?", ("no", "barely", "partly", "mostly", "fully"))
SAMPLES = PROMETHEUS_VISION


def req(rid: str, images=()) -> JudgeRequest:
    return JudgeRequest(f"What is in photo {rid}?", "A cat.", RUBRIC, images=images, id=rid)


A, B = ImageRef(data=b"image-a"), ImageRef(data=b"image-b")


def test_bridge_layout_is_fixed_and_text_rows_pass_through():
    assert bridge_instruction("Q?", ["a cat"]) == "Image description: a cat\n\nQ?"
    assert bridge_instruction("Q?", ["a cat", " a dog "]) == "Image 1 description: a cat\nImage 2 description: a dog\n\nQ?"
    plain = req("t")
    out = caption_bridge([req("1", [A]), plain], ["A ginger cat on a rug.", None])
    assert out[1] is plain
    assert out[0].images == () and out[0].instruction == "Image description: A ginger cat on a rug.\n\nWhat is in photo 1?"
    assert out.source == "given captions (list)" and out.captions == {"1": "A ginger cat on a rug."}
    text = render(out[0]).user
    assert "Image description: A ginger cat" in text and "An image is given" not in text


def test_captions_by_id_image_key_or_per_image_and_by_function():
    reqs = [req("1", [A]), req("2", [B]), req("3", [A, B])]
    by_key = caption_bridge(reqs, {A.key: "cat", B.key: "dog"}, source="human captions v1")
    assert [r.instruction.split("\n\n")[0] for r in by_key] == [
        "Image description: cat", "Image description: dog", "Image 1 description: cat\nImage 2 description: dog"]
    assert by_key.source == "human captions v1"
    by_id = caption_bridge(reqs, {"1": "x", "2": "y", "3": "both"})
    assert by_id[2].instruction.startswith("Image description: both\n\n")
    on_disk = ImageRef(path=str(Path(__file__).resolve()))
    assert caption_bridge([req("p", [on_disk])], {on_disk.path: "a file"})[0].instruction.startswith(
        "Image description: a file\n\n")
    fn = caption_bridge(reqs, lambda im: {A.key: "cat", B.key: "dog"}[im.key])
    assert fn[2].instruction == by_key[2].instruction and fn.source == "function <lambda>"


def test_missing_captions_fail_naming_every_request():
    with pytest.raises(ValueError, match=r"2 request\(s\): \['1', '3'\]"):
        caption_bridge([req("1", [A]), req("2", [B]), req("3", [A])], {B.key: "dog"})
    with pytest.raises(ValueError, match="2 requests but 1 captions"):
        caption_bridge([req("1", [A]), req("2")], ["x"])
    with pytest.raises(ValueError, match="no caption"):
        caption_bridge([req("1", [A])], ["   "])


def test_backend_captioner_captions_each_image_once_and_records_its_source():
    seen: list[str] = []

    def script(prompt, n):
        seen.append(prompt.images[0].key)
        if prompt.images[0] == B:
            raise RuntimeError("cannot read this one")
        return f"  caption {n}  "

    cap = BackendCaptioner(MockBackend("tiny-captioner", script=script), max_new_tokens=32)
    assert cap.source == "model tiny-captioner (default caption prompt), greedy, max_new_tokens=32"
    assert cap.caption([A, A, B]) == ["caption 1", "caption 1", None]
    assert "cannot read this one" in cap.errors[B.key]
    assert cap.caption([A]) == ["caption 1"] and seen == [A.key, B.key]  # A is cached
    with pytest.raises(ValueError, match=r"\['2'\]"):
        caption_bridge([req("1", [A]), req("2", [B])], cap)
    out = caption_bridge([req("1", [A]), req("3", [A])], cap)
    assert out.source == cap.source and out[1].instruction.startswith("Image description: caption 1")


def test_a_real_captioning_model_through_the_hf_backend(tiny_llava_dir, sample_images):
    cap = BackendCaptioner(get_backend("hf", model=str(tiny_llava_dir), min_new_tokens=4), max_new_tokens=6)
    photos = [ImageRef(path=str(sample_images[n])) for n in ("astronaut", "chelsea")]
    caps = cap.caption(photos + photos[:1])
    assert cap.errors == {} and all(isinstance(c, str) and c for c in caps)
    assert caps[0] == caps[2]
    out = caption_bridge([req("1", photos[:1])], cap)
    assert out[0].instruction.startswith(f"Image description: {caps[0]}") and str(tiny_llava_dir) in out.source


def test_text_judge_refuses_images_per_row_or_grades_their_captions():
    judge = TextJudge.load("mock")
    out = judge.grade([req("1", [A]), req("2")])
    assert out[0].status == "error" and out[0].reason == REFUSED and out[0].score is None
    assert out[1].status == "ok" and len(judge.backend.calls) == 1
    captioned = TextJudge.load("mock", captions={A.key: "a tabby cat"})
    out = captioned.grade([req("1", [A]), req("2")])
    assert [j.status for j in out] == ["ok", "ok"] and [j.id for j in out] == ["1", "2"]
    [sent] = [p for p in captioned.backend.calls if "photo 1" in p.user]
    assert "Image description: a tabby cat\n\nWhat is in photo 1?" in sent.user and "An image is given" not in sent.user
    assert all(p.images == () for p in captioned.backend.calls)
    assert captioned.caption_source == "given captions (mapping)"


def test_presets_pick_the_published_model():
    judge = TextJudge.load("prometheus-2-7b", backend="mock")
    assert judge.name == "prometheus-eval/prometheus-7b-v2.0" and judge.config.template == "prometheus"
    [j] = judge.absolute_grade("Explain tides.", "The moon pulls the sea.", RUBRIC)
    assert j.judge == "prometheus-eval/prometheus-7b-v2.0"


def test_perception_rows_become_feedback_collection_rows_a_text_judge_reads_like_the_bridge(tmp_path, sample_images):
    rows = [json.loads(x) for x in (SAMPLES / "sample_eval_data.jsonl").read_text().splitlines()]
    captions = {rows[0]["image"]: "A skeletal formula of an amino acid.", rows[1]["image"]: "Coloured balls and sticks."}
    errors: dict[str, str] = {}
    fc = list(perception_to_feedback(rows, captions, source="test captions", errors=errors))
    assert len(fc) == 2 and errors == {"2": "no caption for image '../train2017/000000562014.jpg'"}
    for src, out in zip(rows, fc):
        assert "image" not in out and out["caption_source"] == "test captions"
        assert out["orig_instruction"] == bridge_instruction(src["orig_instruction"], [captions[src["image"]]])
        assert out["original_response"] == src["original_response"] and out["orig_criteria"] == src["orig_criteria"]
        assert "###Task Description:" in out["instruction"] and "An image is given" not in out["instruction"]
    # the converted row, read back as a text row, renders exactly like the bridged vision row
    (tmp_path / "fc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fc))
    text_req = dict(read_requests(tmp_path / "fc.jsonl"))["0"]
    data = tmp_path / "data"
    (tmp_path / "mmmu").mkdir()
    data.mkdir()
    shutil.copy(sample_images["coffee"], tmp_path / "mmmu" / "9900.png")
    (data / "pc.jsonl").write_text(json.dumps(rows[0]) + "\n")
    vision_req = dict(read_requests(data / "pc.jsonl", InputOptions(image_rewrites={"../mmmu/": "../mmmu/"},
                                                                       allowed=[tmp_path / "mmmu"])))["0"]
    bridged = caption_bridge([vision_req], [captions[rows[0]["image"]]])[0]
    assert render(bridged).user == render(text_req).user == fc[0]["instruction"]
