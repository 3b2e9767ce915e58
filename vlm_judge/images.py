"""Turn image references from user data into ImageRefs and pixels, safely.

Published rows carry relative paths that climb out of the data folder (`../train2017/x.jpg`).
Users point them at their own folders with an image root and prefix rewrites; a path that still
escapes the folders they allowed is refused rather than read.

Pixels are decoded defensively: the header is checked (pixel count and aspect ratio) before any
pixel is decoded, an image is decoded only to the size the model uses (JPEG DCT scaling, a
thumbnail before the RGB conversion), and decoded or preprocessed images are cached by their size
in bytes under a budget (`ByteCache`), never by count: a few huge images must not fill memory.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

from vlm_judge.records import ImageRef, RecordError


class ImageError(RecordError):
    """An image could not be found, was refused, or could not be decoded."""


def resolve_image(
    value: Any,
    root: str | Path | None = None,
    rewrites: dict[str, str] | None = None,
    allowed: Iterable[str | Path] | None = None,
) -> ImageRef:
    """An ImageRef from a path string, bytes, or a `datasets` Image dict ({'bytes','path'}).

    `rewrites` maps path prefixes to replacements (e.g. {'../train2017/': '/data/coco/train2017/'}),
    applied before `root`. Resolved paths must lie inside `allowed` (default: the root, or anywhere
    when neither is given).
    """
    if isinstance(value, ImageRef):
        return value
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            if not isinstance(value["bytes"], (bytes, bytearray, memoryview)):
                raise ImageError(f"image 'bytes' must be the encoded file's bytes, got a {type(value['bytes']).__name__}")
            return ImageRef(data=bytes(value["bytes"]))
        value = value.get("path")
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return ImageRef(data=buf.getvalue())
    if not isinstance(value, (str, Path)) or not str(value):
        raise ImageError(f"unusable image reference {value!r}")
    s = str(value)
    if s.startswith(("http://", "https://")):
        raise ImageError(f"image URLs are not fetched: {s}")
    for old, new in (rewrites or {}).items():
        if s.startswith(old):
            s = new + s[len(old):]
            break
    p = Path(s)
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    p = p.resolve()
    bounds = [Path(a).resolve() for a in allowed] if allowed is not None else ([Path(root).resolve()] if root else [])
    if bounds and not any(p == b or b in p.parents for b in bounds):
        raise ImageError(f"image path {value!r} resolves to {p}, outside the allowed folders {[str(b) for b in bounds]}")
    if not p.is_file():
        raise ImageError(f"image file not found: {p}")
    return ImageRef(path=str(p))


MAX_ASPECT_RATIO = 20.0
"""Longest side over shortest side beyond which an image is refused from its header. A processor
scales the short side up to its input size, so a 200000x1 strip would become gigabytes of pixels;
no judge input (photo, chart, screenshot, scanned page) is anywhere near 20:1."""
DEFAULT_MAX_PIXELS = 50_000_000
"""Pixels (width x height, from the header) over which an image is refused."""
IMAGE_CACHE_BYTES = int(os.environ.get("VLM_JUDGE_IMAGE_CACHE_BYTES", 1 << 30))
"""Default budget of each image cache, in bytes (1 GiB; set VLM_JUDGE_IMAGE_CACHE_BYTES to change it)."""


class ByteCache:
    """A thread-safe LRU cache bounded by the total size of its values in bytes.

    `get_or_make(key, make, size)` computes a missing value outside the lock (two threads may then
    make the same value once each; the cache keeps one). A value larger than the whole budget is
    returned but not kept.
    """

    def __init__(self, budget_bytes: int = IMAGE_CACHE_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget = budget_bytes
        self.used = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys held now (a snapshot: other threads may change the cache meanwhile)."""
        with self._lock:
            return iter(list(self._items))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
            if size > self.budget:
                return
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.budget:
                _, (_, n) = self._items.popitem(last=False)
                self.used -= n

    def get_or_make(self, key: Hashable, make: Callable[[], Any], size: Callable[[Any], int]) -> Any:
        hit = self.get(key)
        if hit is not None:
            return hit
        value = make()
        self.put(key, value, size(value))
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0


def _open(source: str | Path | bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def _check_header(im: Any, max_pixels: int, max_aspect: float, name: str) -> dict[str, Any]:
    w, h = im.width, im.height
    info = {"format": im.format, "mode": im.mode, "frames": getattr(im, "n_frames", 1), "width": w, "height": h}
    if w < 1 or h < 1:
        raise ImageError(f"image {name} is {w}x{h}: empty")
    if w * h > max_pixels:
        raise ImageError(f"image {name} is {w}x{h}, over the {max_pixels}-pixel limit")
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageError(f"image {name} is {w}x{h}, an aspect ratio over the {max_aspect:g}:1 limit")
    return info


def check_image(source: ImageRef | str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "",
                max_aspect: float = MAX_ASPECT_RATIO) -> dict[str, Any]:
    """Check an image without decoding its pixels: a format PIL reads, at most `max_pixels` and an
    aspect ratio within `max_aspect` (from the header), chunks intact (PIL's `verify`, which reads
    a PNG's checksums without inflating it). Returns what `decode_image` returns as info; raises
    ImageError with the reason."""
    if isinstance(source, ImageRef):
        name = name or source.path or source.key[:60]
        source = source.path if source.path is not None else (source.data or b"")
    name = name or "(bytes)"
    try:
        with _open(source) as im:
            info = _check_header(im, max_pixels, max_aspect, name)
            im.verify()
            return info
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for unreadable files
        raise ImageError(f"cannot decode image {name or '(bytes)'}: {type(e).__name__}: {e}") from e


def decode_image(source: str | Path | bytes, max_pixels: int, name: str, min_side: int | None = None,
                 max_aspect: float = MAX_ASPECT_RATIO) -> tuple[Any, dict[str, Any]]:
    """Decode an image file (or its bytes) to RGB, refusing from its header one over `max_pixels`
    or beyond `max_aspect`, so a decompression bomb never reaches memory. Returns (RGB PIL image,
    what the file was: {'format', 'mode', 'frames', 'width', 'height'}). `name` identifies the
    image in errors.

    `min_side`: the model's input size. A larger image is decoded straight to a smaller size
    whose short side is still at least `min_side` (JPEG: scaled while decoding; others: reduced
    before the RGB conversion), which is all a processor that resizes to `min_side` uses.
    """
    try:
        with _open(source) as im:
            info = _check_header(im, max_pixels, max_aspect, name)
            short = min(im.width, im.height)
            if min_side and short > min_side:
                scale = min_side / short
                box = (max(1, math.ceil(im.width * scale)), max(1, math.ceil(im.height * scale)))
                if im.mode in ("1", "P"):  # palette pixels cannot be averaged: convert first
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                im.thumbnail(box)  # for a JPEG this sets a DCT-scaled draft before decoding
            else:
                im.load()
            return im.convert("RGB"), info
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


_decoded = ByteCache(IMAGE_CACHE_BYTES // 4)
"""Decoded RGB images for callers without their own cache of processed inputs (vllm, training)."""


def load_image(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Any:
    """Decode to an RGB PIL image, once per distinct image while it fits the cache's byte budget
    (`set_image_cache_bytes`); `min_side` as for `decode_image`."""
    def make() -> Any:
        return decode_image(ref.path if ref.path is not None else (ref.data or b""), max_pixels,
                            ref.path or ref.key[:60], min_side)[0]

    return _decoded.get_or_make((ref.key, max_pixels, min_side), make, lambda im: im.width * im.height * 3)


def set_image_cache_bytes(budget: int) -> None:
    """Change the byte budget of `load_image`'s cache of decoded images (it is emptied)."""
    global _decoded
    _decoded = ByteCache(budget)
