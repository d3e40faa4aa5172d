"""Pure image work for ingest (runs in the CPU executor, never on the event loop)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF", "GIF"}
THUMB_PX = 256
MAX_PIXELS = 150_000_000
ORIENTATION_TAG = 0x0112


class BadImageError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Probed:
    info: dict[str, Any]
    thumbnail: bytes


def probe(data: bytes) -> Probed:
    """Identify, check and thumbnail an image; raise :class:`BadImageError` saying why."""
    if not data:
        raise BadImageError("the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                raise BadImageError(
                    f"unsupported image type {fmt}; accepted: {', '.join(sorted(ACCEPTED_FORMATS))}"
                )
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise BadImageError(
                    f"{width}x{height} is {width * height:,} pixels, "
                    f"over the limit of {MAX_PIXELS:,}"
                )
            mode = img.mode
            # Shrink first (JPEG decodes at reduced scale), then turn upright: rotating the
            # full-size image would copy all of it once more.
            img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
            small = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            small.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
            small.getexif()[ORIENTATION_TAG] = orientation
            thumb = ImageOps.exif_transpose(small)
            out = io.BytesIO()
            thumb.save(out, "WEBP", quality=80, method=4)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"corrupt or truncated image: {exc}") from None
    info = {
        "format": fmt,
        "width": width,
        "height": height,
        "mode": mode,
        "thumbnail": {"px": THUMB_PX, "width": thumb.width, "height": thumb.height},
    }
    return Probed(info, out.getvalue())
