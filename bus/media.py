"""Recognising image types from their first bytes (never from names or client headers)."""

from __future__ import annotations

from dataclasses import dataclass

SNIFF_BYTES = 32


@dataclass(frozen=True, slots=True)
class MediaType:
    name: str
    mime: str
    extension: str


JPEG = MediaType("JPEG", "image/jpeg", "jpg")
PNG = MediaType("PNG", "image/png", "png")
GIF = MediaType("GIF", "image/gif", "gif")
WEBP = MediaType("WebP", "image/webp", "webp")
TIFF = MediaType("TIFF", "image/tiff", "tiff")
HEIC = MediaType("HEIC", "image/heic", "heic")
AVIF = MediaType("AVIF", "image/avif", "avif")
ACCEPTED = (JPEG, PNG, GIF, WEBP, TIFF)


def sniff(head: bytes) -> MediaType | None:
    """The image type ``head`` (the first bytes of a file) starts with, if any."""
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return TIFF
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return AVIF
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return HEIC
    return None


def accepted_names() -> str:
    return ", ".join(t.name for t in ACCEPTED)
