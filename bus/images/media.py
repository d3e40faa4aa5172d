"""Recognising image types from their first bytes (never from names or client headers),
and making client-supplied file names safe to store."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote

SNIFF_BYTES = 32
MAX_NAME_CHARS = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class MediaType:
    name: str
    mime: str
    extension: str
    # Pillow's format names for it; the first is the decoder that opens it. JPEG also
    # comes back as MPO: a JPEG carrying more pictures (stereo and dual-camera phones).
    decoders: tuple[str, ...]


JPEG = MediaType("JPEG", "image/jpeg", "jpg", ("JPEG", "MPO"))
PNG = MediaType("PNG", "image/png", "png", ("PNG",))
GIF = MediaType("GIF", "image/gif", "gif", ("GIF",))
WEBP = MediaType("WebP", "image/webp", "webp", ("WEBP",))
TIFF = MediaType("TIFF", "image/tiff", "tiff", ("TIFF",))
HEIC = MediaType("HEIC", "image/heic", "heic", ("HEIF",))
AVIF = MediaType("AVIF", "image/avif", "avif", ("AVIF",))
ACCEPTED = (JPEG, PNG, GIF, WEBP, TIFF, HEIC, AVIF)
BY_MIME = {t.mime: t for t in ACCEPTED}
BY_DECODER = {d: t for t in ACCEPTED for d in t.decoders}


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


def safe_name(name: str | None, extension: str) -> str:
    """A storage-safe file name: no directories, control characters or odd bytes."""
    base = unquote(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE.sub("_", base).strip("._")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = stem[: MAX_NAME_CHARS - len(extension) - 1] or "image"
    return f"{stem}.{extension}"
