"""Image sources of the data builder on real files: COCO annotation JSON over real photos, an
MMMU-format parquet (and save_to_disk folder) with embedded image bytes written by `datasets`,
and a plain folder with metadata, a corrupt file, a too-small image and images needing RGB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from perception_collection.config import ConfigError, SourceConfig
from perception_collection.sources import SourceError, load_source, validate_image


@pytest.fixture
def coco_dir(tmp_path, sample_images):
    """val/ with three real photos, one corrupt file; one listed image is missing on disk."""
    img_dir = tmp_path / "val"
    img_dir.mkdir()
    names = ["astronaut", "chelsea", "coffee"]
    images = []
    for i, n in enumerate(names, start=1):
        Image.open(sample_images[n]).convert("RGB").save(img_dir / f"{i:012d}.jpg", format="JPEG")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 64})
    (img_dir / "000000000004.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    images.append({"id": 4, "file_name": "000000000004.jpg", "width": 64, "height": 64})
    images.append({"id": 5, "file_name": "000000000005.jpg", "width": 64, "height": 64})  # missing file
    captions = {"images": images, "annotations": [
        {"id": 10, "image_id": 1, "caption": "An astronaut in a white suit poses in front of a flag."},
        {"id": 11, "image_id": 1, "caption": "A person in a space suit holding a helmet."},
        {"id": 12, "image_id": 2, "caption": "A ginger cat looks to the side."},
    ]}
    instances = {"images": images, "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"},
                                                    {"id": 47, "name": "cup"}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                                 {"id": 2, "image_id": 2, "category_id": 17, "bbox": [0, 0, 10, 10]},
                                 {"id": 3, "image_id": 3, "category_id": 47, "bbox": [0, 0, 5, 5]},
                                 {"id": 4, "image_id": 3, "category_id": 47, "bbox": [5, 5, 5, 5]}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return tmp_path


def test_coco_captions_and_labels_become_context_and_bad_images_are_dropped(coco_dir, tmp_path):
    cfg = SourceConfig(kind="coco", images=str(coco_dir / "val"), captions=str(coco_dir / "captions.json"),
                       instances=str(coco_dir / "instances.json"))
    images, drops = load_source(cfg, tmp_path / "run")
    assert [im.image_id for im in images] == ["coco-000000000001", "coco-000000000002", "coco-000000000003"]
    astro = images[0]
    assert "An astronaut in a white suit" in astro.context and "1 person" in astro.context
    assert images[2].meta["labels"] == {"cup": 2} and "2 cup" in images[2].context
    assert astro.meta["width"] == 64 and astro.source == "coco" and Path(astro.path).is_file()
    reasons = {d.id: d.reason for d in drops}
    assert set(reasons) == {"coco-000000000004", "coco-000000000005"}
    assert "cannot decode" in reasons["coco-000000000004"]
    assert "not found" in reasons["coco-000000000005"]
    assert all(d.stage == "source" for d in drops)


def test_coco_limit_counts_kept_images_and_captions_only_works(coco_dir, tmp_path):
    cfg = SourceConfig(kind="coco", images=str(coco_dir / "val"), captions=str(coco_dir / "captions.json"), limit=2)
    images, drops = load_source(cfg, tmp_path / "run")
    assert len(images) == 2 and not drops
    assert "Objects" not in images[0].context


def test_coco_missing_annotation_file_is_a_source_error(coco_dir, tmp_path):
    cfg = SourceConfig(kind="coco", images=str(coco_dir / "val"), captions=str(coco_dir / "nope.json"))
    with pytest.raises(SourceError, match="not found"):
        load_source(cfg, tmp_path)


def _mmmu_rows(sample_images):
    def b(name):
        return {"bytes": sample_images[name].read_bytes(), "path": None}

    return {
        "id": ["validation_Art_1", "validation_Art_2", "validation_Biology_3", "validation_Art_4"],
        "question": ["What animal is shown in <image 1>?", "What is the person wearing in <image 1>?",
                     "Compare <image 1> and <image 2>.", "What is in <image 1>?"],
        "options": ["['dog', 'cat', 'horse']", "['a space suit', 'a raincoat']", "['same', 'different']", "[]"],
        "answer": ["B", "A", "A", "rocket"],
        "image_1": [b("chelsea"), b("astronaut"), b("coffee"), {"bytes": b"garbage bytes", "path": None}],
        "image_2": [None, None, b("rocket"), None],
        "question_type": ["multiple-choice", "multiple-choice", "multiple-choice", "open"],
    }


def test_mmmu_parquet_written_by_datasets(tmp_path, sample_images):
    import datasets

    feats = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                               "options": datasets.Value("string"), "answer": datasets.Value("string"),
                               "image_1": datasets.Image(), "image_2": datasets.Image(),
                               "question_type": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(_mmmu_rows(sample_images), features=feats)
    pq = tmp_path / "Art" / "validation-00000-of-00001.parquet"
    pq.parent.mkdir()
    ds.to_parquet(str(pq))
    run = tmp_path / "run"
    images, drops = load_source(SourceConfig(kind="mmmu", path=str(tmp_path / "Art")), run)
    assert [im.image_id for im in images] == ["mmmu-validation_Art_1", "mmmu-validation_Art_2"]
    cat = images[0]
    assert cat.meta["subject"] == "Art" and cat.meta["answer"] == "B" and cat.meta["options"] == ["dog", "cat", "horse"]
    assert "(B) cat" in cat.context and "What animal is shown in the image?" in cat.context and "Answer: B" in cat.context
    # the text-only export's stand-in for the image must not give the answer away
    assert "(B) cat" in cat.meta["caption"] and "Answer" not in cat.meta["caption"]
    # the image bytes were written under the run folder, unchanged
    assert Path(cat.path).is_relative_to(run.resolve()) and Path(cat.path).read_bytes() == sample_images["chelsea"].read_bytes()
    reasons = {d.id: d.reason for d in drops}
    assert "multi-image" in reasons["mmmu-validation_Biology_3"]
    assert "cannot decode" in reasons["mmmu-validation_Art_4"]
    # a re-run reuses the written files and gives the same images
    again, _ = load_source(SourceConfig(kind="mmmu", path=str(pq)), run)
    assert [im.path for im in again] == [im.path for im in images]
    # multi-image questions can be kept with their first image
    more, _ = load_source(SourceConfig(kind="mmmu", path=str(pq), skip_multi_image=False), run)
    assert "mmmu-validation_Biology_3" in {im.image_id for im in more}


def test_mmmu_save_to_disk_folder(tmp_path, sample_images):
    import datasets

    rows = _mmmu_rows(sample_images)
    rows = {k: v[:2] for k, v in rows.items()}
    feats = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                               "options": datasets.Value("string"), "answer": datasets.Value("string"),
                               "image_1": datasets.Image(), "image_2": datasets.Image(),
                               "question_type": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "mmmu_art"))
    images, drops = load_source(SourceConfig(kind="mmmu", path=str(tmp_path / "mmmu_art")), tmp_path / "run")
    assert len(images) == 2 and not drops and images[1].meta["subject"] == "Art"


@pytest.fixture
def folder(tmp_path, sample_images):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.open(sample_images["rocket"]).convert("RGB").save(d / "rocket.jpg")
    Image.open(sample_images["chelsea"]).convert("RGBA").save(d / "sub" / "cat.png")  # alpha: converted
    Image.open(sample_images["coffee"]).convert("CMYK").save(d / "coffee.jpg")  # CMYK: converted
    Image.new("RGB", (8, 8), "red").save(d / "tiny.png")
    (d / "broken.jpg").write_bytes(b"\x00" * 50)
    (d / "notes.txt").write_text("not an image")
    (d / "metadata.jsonl").write_text(
        json.dumps({"file_name": "rocket.jpg", "caption": "A rocket on the launch pad.", "license": "CC0"}) + "\n"
        + json.dumps({"file_name": "sub/cat.png", "text": "A cat."}) + "\n")
    return d


def test_folder_with_metadata_corrupt_tiny_and_conversion(folder, tmp_path):
    run = tmp_path / "run"
    images, drops = load_source(SourceConfig(kind="folder", path=str(folder)), run)
    by_id = {im.image_id: im for im in images}
    assert set(by_id) == {"folder-coffee.jpg", "folder-rocket.jpg", "folder-sub_cat.png"}
    assert by_id["folder-rocket.jpg"].context == "A rocket on the launch pad."
    assert by_id["folder-rocket.jpg"].meta["license"] == "CC0"
    assert by_id["folder-sub_cat.png"].context == "A cat."
    # converted copies are RGB PNGs under the run folder; plain RGB JPEGs are used in place
    for iid in ("folder-coffee.jpg", "folder-sub_cat.png"):
        p = Path(by_id[iid].path)
        assert p.is_relative_to(run.resolve()) and Image.open(p).mode == "RGB" and Image.open(p).format == "PNG"
    assert Path(by_id["folder-rocket.jpg"].path) == (folder / "rocket.jpg").resolve()
    reasons = {d.id: d.reason for d in drops}
    assert set(reasons) == {"folder-broken.jpg", "folder-tiny.png"}
    assert "cannot decode" in reasons["folder-broken.jpg"]
    assert "min_side" in reasons["folder-tiny.png"]


def test_folder_pixel_limit_and_csv_metadata(folder, tmp_path):
    meta = tmp_path / "meta.csv"
    meta.write_text("file_name,context,grade\nrocket.jpg,Launch day.,7\n")
    images, drops = load_source(SourceConfig(kind="folder", path=str(folder), metadata=str(meta), max_pixels=64 * 64 - 1),
                                tmp_path / "run")
    assert images == []
    assert any("pixel limit" in d.reason for d in drops)
    images, _ = load_source(SourceConfig(kind="folder", path=str(folder), metadata=str(meta)), tmp_path / "run")
    rocket = next(im for im in images if im.image_id == "folder-rocket.jpg")
    assert rocket.context == "Launch day." and rocket.meta["grade"] == "7"


def test_max_side_sends_a_scaled_copy(folder, tmp_path):
    images, _ = load_source(SourceConfig(kind="folder", path=str(folder), max_side=40), tmp_path / "run")
    rocket = next(im for im in images if im.image_id == "folder-rocket.jpg")
    assert Image.open(rocket.path).size == (40, 40) and rocket.meta["original_size"] == [64, 64]
    assert (folder / "rocket.jpg").is_file() and Image.open(folder / "rocket.jpg").size == (64, 64)  # original untouched


def test_validate_image_refuses_conversion_without_folder(folder):
    cfg = SourceConfig(kind="folder", path=str(folder))
    path, size = validate_image(folder / "rocket.jpg", cfg)
    assert size == {"width": 64, "height": 64}
    with pytest.raises(ValueError, match="converting"):
        validate_image(folder / "coffee.jpg", cfg)


def test_source_config_errors_name_the_fields():
    with pytest.raises(ConfigError, match="source.kind"):
        SourceConfig(kind="flickr")
    with pytest.raises(ConfigError, match="source.captions"):
        SourceConfig(kind="coco", images="x")
    with pytest.raises(ConfigError, match="source.path"):
        SourceConfig(kind="mmmu")
    with pytest.raises(ConfigError, match="source.limit"):
        SourceConfig(kind="folder", path="x", limit=0)


