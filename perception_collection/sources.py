"""Image sources: COCO, MMMU, a plain folder (and easy-vqa, via sources_easyvqa), as SourceImages.

Every image is validated before the teacher sees it: the file opens and decodes, its pixel count
(read from the header first, so a decompression bomb is never decoded) and shorter side are within
limits, and images a chat server may not take (CMYK/palette/16-bit modes, TIFF, ...) are converted
to an RGB PNG under the run folder. A skipped image becomes a `Drop` with the reason; the others go on.

`load_source(cfg, run_dir)` picks the loader by `cfg.kind` from a small registry.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from perception_collection.config import SourceConfig
from perception_collection.rows import Drop, SourceImage
from vlm_judge.images import ImageError, decode_image
from vlm_judge.jsonl import BadLine, iter_jsonl

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SERVER_FORMATS = ("JPEG", "PNG", "WEBP")
"""Formats sent to the teacher as they are; others are re-encoded as PNG."""

Loader = Callable[[SourceConfig, Path], tuple[list[SourceImage], list[Drop]]]


class SourceError(ValueError):
    """The source as a whole cannot be read (missing annotation file, unreadable parquet)."""


# ---- validation ------------------------------------------------------------------------------


def validate_image(path: str | Path, cfg: SourceConfig, convert_dir: Path | None = None) -> tuple[str, dict[str, Any]]:
    """(path to send to the teacher, {'width', 'height'}) or ImageError with the reason.

    The returned path is the original unless the image had to be converted to RGB PNG (written
    to `convert_dir`, named by a hash of the original's bytes so re-runs reuse it).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"image file not found: {p}")
    # not vlm_judge.images.load_image: its cache would keep hundreds of decoded images of a dataset scan alive
    im, raw = decode_image(p, cfg.max_pixels, str(p))
    fmt, mode, n_frames, w, h = raw["format"], raw["mode"], raw["frames"], raw["width"], raw["height"]
    if min(w, h) < cfg.min_side:
        raise ImageError(f"image is {w}x{h}, shorter side under source.min_side={cfg.min_side}")
    too_big = cfg.max_side is not None and max(w, h) > cfg.max_side
    if fmt in _SERVER_FORMATS and mode in ("RGB", "L") and n_frames == 1 and not too_big:
        return str(p.resolve()), {"width": w, "height": h}
    if convert_dir is None:
        raise ImageError(f"image needs converting ({fmt} {mode}) but no folder was given for the RGB copy")
    convert_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(p.read_bytes()).hexdigest()[:16]
    size_tag = f"-{cfg.max_side}" if too_big else ""
    out = convert_dir / f"{p.stem}-{digest}{size_tag}.png"
    if too_big:
        im.thumbnail((cfg.max_side, cfg.max_side))  # keeps the aspect ratio
    if not out.is_file():
        tmp = out.with_suffix(".png.tmp")
        im.save(tmp, format="PNG")
        tmp.replace(out)
    info = {"width": im.width, "height": im.height, "converted_from": f"{fmt} {mode}"}
    if too_big:
        info["original_size"] = [w, h]
    return str(out.resolve()), info


def _validated(
    candidates: Iterable[tuple[str, Path, str, dict[str, Any]]], cfg: SourceConfig, source: str, convert_dir: Path,
) -> tuple[list[SourceImage], list[Drop]]:
    """Validate (image_id, path, context, meta) candidates in order until `cfg.limit` are kept."""
    images: list[SourceImage] = []
    drops: list[Drop] = []
    seen: set[str] = set()
    for image_id, path, context, meta in candidates:
        if cfg.limit is not None and len(images) >= cfg.limit:
            break
        if image_id in seen:
            drops.append(Drop(image_id, "source", "duplicate image id"))
            continue
        seen.add(image_id)
        try:
            final, size = validate_image(path, cfg, convert_dir)
        except ImageError as e:
            drops.append(Drop(image_id, "source", str(e)))
            continue
        images.append(SourceImage(image_id=image_id, path=final, source=source, context=context,
                                  meta={**meta, **size}))
    return images, drops


def _safe_id(s: str) -> str:
    """An id without '/' (ids of later records are '<image_id>/r<k>/...')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


# ---- COCO ------------------------------------------------------------------------------------


def _read_json(path: str | None, what: str) -> dict[str, Any] | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"COCO {what} file not found: {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SourceError(f"COCO {what} file {p} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise SourceError(f"COCO {what} file {p} has no 'images' list (is it a COCO annotation file?)")
    return d


def coco_context(captions: list[str], labels: Counter) -> str:
    """The text the teacher reads beside a COCO image: its captions and object counts."""
    parts = []
    if captions:
        parts.append("Captions:\n" + "\n".join(f"- {c.strip()}" for c in captions))
    if labels:
        parts.append("Objects: " + ", ".join(f"{n} {name}" for name, n in sorted(labels.items())))
    return "\n".join(parts)


def load_coco(cfg: SourceConfig, run_dir: Path) -> tuple[list[SourceImage], list[Drop]]:
    """COCO captions and/or instances JSON over an image folder, in image-id order."""
    caps = _read_json(cfg.captions, "captions")
    inst = _read_json(cfg.instances, "instances")
    folder = Path(cfg.images or cfg.path or ".")
    if not folder.is_dir():
        raise SourceError(f"COCO image folder not found: {folder}")
    infos: dict[int, dict[str, Any]] = {}
    for d in (caps, inst):
        for im in (d or {}).get("images", []):
            infos.setdefault(im["id"], im)
    captions: dict[int, list[str]] = {}
    for a in (caps or {}).get("annotations", []):
        if isinstance(a.get("caption"), str):
            captions.setdefault(a["image_id"], []).append(a["caption"])
    names = {c["id"]: c["name"] for c in (inst or {}).get("categories", [])}
    labels: dict[int, Counter] = {}
    for a in (inst or {}).get("annotations", []):
        name = names.get(a.get("category_id"))
        if name:
            labels.setdefault(a["image_id"], Counter())[name] += 1

    def candidates() -> Iterator[tuple[str, Path, str, dict[str, Any]]]:
        for cid in sorted(infos):
            info = infos[cid]
            image_id = f"coco-{cid:012d}" if isinstance(cid, int) else f"coco-{_safe_id(str(cid))}"
            lab = labels.get(cid, Counter())
            meta = {"coco_id": cid, "file_name": info.get("file_name"), "captions": captions.get(cid, []),
                    "labels": dict(sorted(lab.items()))}
            yield image_id, folder / str(info.get("file_name", "")), coco_context(captions.get(cid, []), lab), meta

    return _validated(candidates(), cfg, "coco", run_dir / "images" / "converted")


# ---- MMMU ------------------------------------------------------------------------------------


def _mmmu_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Rows of MMMU-format data with the subject hint from the folder name: a parquet file, a
    folder of parquet files (MMMU's `<Subject>/<split>-*.parquet`), or a `save_to_disk` folder."""
    if path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("reading a save_to_disk folder needs datasets: pip install 'vlm-judge[data]'") from e

        loaded = datasets.load_from_disk(str(path))
        splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for ds in splits:
            for name, feat in ds.features.items():  # keep the encoded bytes; do not decode to PIL
                if isinstance(feat, datasets.Image):
                    ds = ds.cast_column(name, datasets.Image(decode=False))
            yield from ((dict(r), path.name) for r in ds)
        return
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise SourceError(f"MMMU data not found at {path} (expected a .parquet file or a folder of them)")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading MMMU parquet files needs pyarrow: pip install 'vlm-judge[data]'") from e

    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise SourceError(f"cannot read MMMU parquet {f}: {type(e).__name__}: {e}") from e
        for batch in pf.iter_batches(batch_size=64):
            for r in batch.to_pylist():
                yield r, f.parent.name


def _options(value: Any) -> list[str]:
    """MMMU stores options as the text of a Python list ("['a', 'b']")."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            v = ast.literal_eval(value)
            if isinstance(v, list):
                return [str(x) for x in v]
        except (ValueError, SyntaxError):
            pass
    return []


def mmmu_context(subject: str, question: str, options: list[str], answer: str) -> str:
    """The question, its lettered options and the answer, as the teacher reads them."""
    q = re.sub(r"<image \d+>", "the image", question).strip()
    lines = [f"Subject: {subject}" if subject else "", f"Question: {q}"]
    if options:
        lines.append("Options:\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(options)))
    if answer:
        lines.append(f"Answer: {answer}")
    return "\n".join(x for x in lines if x)


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        return value.get("bytes") or None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


def _ext(data: bytes) -> str:
    from vlm_judge.backends.openai import image_mime

    return {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
            "image/bmp": ".bmp", "image/tiff": ".tif"}.get(image_mime(data), ".bin")


def load_mmmu(cfg: SourceConfig, run_dir: Path) -> tuple[list[SourceImage], list[Drop]]:
    """MMMU rows with embedded images; each image is written to `<run>/images/mmmu/`."""
    path = Path(cfg.path or "")
    if not path.exists():
        raise SourceError(f"MMMU data not found: {path}")
    out_dir = run_dir / "images" / "mmmu"
    out_dir.mkdir(parents=True, exist_ok=True)
    pre_drops: list[Drop] = []

    def candidates() -> Iterator[tuple[str, Path, str, dict[str, Any]]]:
        for i, (row, folder_name) in enumerate(_mmmu_rows(path)):
            rid = str(row.get("id") or f"row{i}")
            image_id = f"mmmu-{_safe_id(rid)}"
            image_cols = sorted((k for k in row if re.fullmatch(r"image(_\d+)?", k) and row[k] is not None),
                                key=lambda k: int(k.split("_")[1]) if "_" in k else 0)
            imgs = [b for b in (_image_bytes(row[k]) for k in image_cols) if b]
            if not imgs:
                pre_drops.append(Drop(image_id, "source", "row has no embedded image bytes"))
                continue
            if len(imgs) > 1 and cfg.skip_multi_image:
                pre_drops.append(Drop(image_id, "source", f"multi-image question ({len(imgs)} images); "
                                      "set source.skip_multi_image=false to use the first image only"))
                continue
            data = imgs[0]
            m = re.match(r"^(?:dev|validation|test)_(.+)_\d+$", rid)
            subject = str(row.get("subject") or (m.group(1) if m else folder_name) or "")
            target = out_dir / f"{image_id}{_ext(data)}"
            if not (target.is_file() and target.stat().st_size == len(data)):
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
            options = _options(row.get("options"))
            answer = str(row.get("answer") or "")
            meta = {"mmmu_id": rid, "subject": subject, "question": row.get("question", ""), "options": options,
                    "answer": answer, "question_type": row.get("question_type"), "img_type": row.get("img_type"),
                    "n_images": len(imgs),
                    # what the text-only export shows in place of the image: the question without its answer
                    "caption": mmmu_context(subject, str(row.get("question") or ""), options, "")}
            yield image_id, target, mmmu_context(subject, str(row.get("question") or ""), options, answer), meta

    images, drops = _validated(candidates(), cfg, "mmmu", run_dir / "images" / "converted")
    return images, pre_drops + drops


# ---- folder ----------------------------------------------------------------------------------

_CONTEXT_KEYS = ("context", "caption", "text", "description")


def _read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """file_name -> row, from a JSONL or CSV file (the `imagefolder` convention)."""
    if not path.is_file():
        raise SourceError(f"folder metadata file not found: {path}")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        for n, row in iter_jsonl(path):
            if isinstance(row, BadLine):
                raise SourceError(f"{path}:{n}: {row.reason}")
            rows.append(row)
    out = {}
    for r in rows:
        name = r.get("file_name") or r.get("image")
        if not name:
            raise SourceError(f"{path}: every metadata row needs a 'file_name' column")
        out[str(name)] = r
    return out


def load_folder(cfg: SourceConfig, run_dir: Path) -> tuple[list[SourceImage], list[Drop]]:
    """Image files under a folder (recursively, sorted), with an optional metadata JSONL/CSV."""
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root}")
    meta_rows: dict[str, dict[str, Any]] = {}
    if cfg.metadata:
        meta_rows = _read_metadata(Path(cfg.metadata))
    else:
        for name in ("metadata.jsonl", "metadata.csv"):
            if (root / name).is_file():
                meta_rows = _read_metadata(root / name)
                break

    def candidates() -> Iterator[tuple[str, Path, str, dict[str, Any]]]:
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
                continue
            rel = p.relative_to(root).as_posix()
            row = meta_rows.get(rel) or meta_rows.get(p.name) or {}
            context = next((str(row[k]) for k in _CONTEXT_KEYS if row.get(k)), "")
            meta = {k: v for k, v in row.items() if k not in _CONTEXT_KEYS and k != "file_name"}
            yield f"folder-{_safe_id(rel)}", p, context, {"file_name": rel, **meta}

    return _validated(candidates(), cfg, "folder", run_dir / "images" / "converted")


# ---- easy-vqa (written by another module) ----------------------------------------------------


def load_easyvqa(cfg: SourceConfig, run_dir: Path) -> tuple[list[SourceImage], list[Drop]]:
    """easy-vqa's shape images with their questions and gold answers (sources_easyvqa.load_source)."""
    mod = importlib.import_module("perception_collection.sources_easyvqa")
    return mod.load_source(split=cfg.split, limit=cfg.limit, root=cfg.path)


LOADERS: dict[str, Loader] = {"coco": load_coco, "mmmu": load_mmmu, "folder": load_folder, "easyvqa": load_easyvqa}


def load_source(cfg: SourceConfig, run_dir: str | Path) -> tuple[list[SourceImage], list[Drop]]:
    """The validated images of the configured source, and a Drop for each one skipped."""
    if cfg.kind not in LOADERS:
        raise SourceError(f"unknown source kind {cfg.kind!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[cfg.kind](cfg, Path(run_dir))
