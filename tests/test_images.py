"""Image decoding and caching (vlm_judge.images): header checks before any pixel, decoding to the
model's size, caches bounded by bytes, and the mock judge that never looks at pixels."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlm_judge.images import ByteCache, ImageError, check_image, decode_image, load_image
from vlm_judge.records import ImageRef


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 0).save(buf, format=fmt)
    return buf.getvalue()


def test_byte_cache_is_bounded_by_bytes_not_count():
    c = ByteCache(100)
    for i in range(10):
        c.put(i, f"v{i}", 30)
    assert c.used <= 100 and list(c) == [7, 8, 9]
    assert c.get(7) == "v7"  # now the most recent
    c.put("big", "x", 101)  # larger than the budget: returned by get_or_make, never kept
    assert "big" not in c and c.get_or_make("big", lambda: "made", lambda v: 101) == "made" and "big" not in c
    c.put(10, "v10", 30)
    assert list(c) == [9, 7, 10]


@pytest.mark.parametrize("size", [(200000, 1), (1, 5000), (2100, 100)])
def test_extreme_aspect_ratios_are_refused_from_the_header(size):
    png = _encoded(size, "PNG", "L")
    with pytest.raises(ImageError, match="aspect ratio over the 20:1 limit"):
        check_image(png)
    with pytest.raises(ImageError, match=f"{size[0]}x{size[1]}"):
        decode_image(png, 50_000_000, "strip")


def test_check_image_reads_no_pixels(monkeypatch):
    png = _encoded((300, 200), "PNG")

    def no_pixels(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_pixels)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    assert check_image(png)["width"] == 300
    with pytest.raises(ImageError, match="cannot decode"):
        check_image(b"\x89PNG\r\n\x1a\n not an image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_decode_only_to_the_models_size(fmt):
    data = _encoded((4000, 3000), fmt)
    im, info = decode_image(data, 50_000_000, "big", min_side=336)
    assert (info["width"], info["height"]) == (4000, 3000)
    assert im.mode == "RGB" and min(im.size) >= 336 and min(im.size) < 700  # JPEG: DCT-scaled, then resized
    assert abs(im.size[0] / im.size[1] - 4 / 3) < 0.01
    small, _ = decode_image(_encoded((100, 80), fmt), 50_000_000, "small", min_side=336)
    assert small.size == (100, 80)  # never upscaled
    full, _ = decode_image(data, 50_000_000, "full")
    assert full.size == (4000, 3000)  # no min_side: the image as it is


def test_load_image_caches_the_reduced_image(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(_encoded((3000, 3000), "JPEG"))
    a = load_image(ImageRef(path=str(p)), min_side=100)
    assert a.size == (100, 100) and load_image(ImageRef(path=str(p)), min_side=100) is a


def test_the_mock_judge_never_decodes_pixels(monkeypatch, tmp_path):
    """Scoring rows that carry images with the mock judge reads image headers, never pixels."""
    from PIL import ImageFile

    from vlm_judge.inputs import InputOptions, read_requests
    from vlm_judge.scorer import Judge

    big = tmp_path / "big.png"
    big.write_bytes(_encoded((3000, 3000), "PNG"))

    def no_pixels(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    monkeypatch.setattr(Image.Image, "load", no_pixels)
    rows = tmp_path / "in.jsonl"
    import json

    rubric = {"criteria": "Accurate?", **{f"score{i}_description": str(i) for i in range(1, 6)}}
    rows.write_text("".join(json.dumps({"id": str(i), "instruction": "Describe.", "response": "Red.", "image": "big.png",
                                        "rubric": rubric}) + "\n" for i in range(3)))
    reqs = [r for _, r in read_requests(str(rows), InputOptions())]
    assert all(not isinstance(r, Exception) for r in reqs), reqs
    judged = Judge.load("mock").grade(reqs)
    assert [j.status for j in judged] == ["ok"] * 3
