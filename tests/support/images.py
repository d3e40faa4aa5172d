"""Small real images made in memory."""

from __future__ import annotations

import io

from PIL import Image


def jpeg(width: int = 320, height: int = 240, color: tuple[int, int, int] = (20, 60, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "JPEG", quality=85)
    return out.getvalue()


def png(
    width: int = 64, height: int = 64, color: tuple[int, int, int, int] = (200, 30, 30, 255)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), color).save(out, "PNG")
    return out.getvalue()
