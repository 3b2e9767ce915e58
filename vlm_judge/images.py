"""Turn image references from user data into ImageRefs and pixels, safely.

Published rows carry relative paths that climb out of the data folder (`../train2017/x.jpg`).
Users point them at their own folders with an image root and prefix rewrites; a path that still
escapes the folders they allowed is refused rather than read.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from functools import lru_cache
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
                raise ImageError(f"an image's 'bytes' must be bytes, got {type(value['bytes']).__name__}")
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


def decode_image(source: str | Path | bytes, max_pixels: int, name: str) -> tuple[Any, dict[str, Any]]:
    """Decode an image file (or its bytes) to RGB, refusing one over `max_pixels` from its header,
    so a decompression bomb never reaches memory. Returns (RGB PIL image, what the file was:
    {'format', 'mode', 'frames', 'width', 'height'}). `name` identifies the image in errors."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            info = {"format": im.format, "mode": im.mode, "frames": getattr(im, "n_frames", 1),
                    "width": im.width, "height": im.height}
            if im.width * im.height > max_pixels:
                raise ImageError(f"image {name} is {im.width}x{im.height}, over the {max_pixels}-pixel limit")
            im.load()
            return im.convert("RGB"), info
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


@lru_cache(maxsize=256)
def _load_cached(key: str, path: str | None, data: bytes | None, max_pixels: int) -> Any:
    return decode_image(path if path is not None else (data or b""), max_pixels, path or key[:60])[0]


def load_image(ref: ImageRef, max_pixels: int = 50_000_000) -> Any:
    """Decode to an RGB PIL image, once per distinct image (cached by identity)."""
    return _load_cached(ref.key, ref.path, ref.data, max_pixels)
