"""Deciding whether uploaded bytes are an image darkroom accepts, before anything is stored.

Two steps, both on the bytes alone (never the file name or the client's content type):
:func:`check_head` sniffs the first bytes as they arrive, so a wrong type is refused before
the rest of the body is read; :func:`check_file` then opens the complete file, checks the
dimensions and frame count from the header (before any pixel is decoded, so a decompression
bomb costs nothing) and decodes the first frame, at 1/8 scale for JPEG, to catch truncated
and corrupt files. It runs in an executor: it is CPU work.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image, UnidentifiedImageError

from bus.core.settings import IngestSettings
from bus.images.media import (
    ACCEPTED,
    BY_DECODER,
    JPEG,
    SNIFF_BYTES,
    MediaType,
    accepted_names,
    sniff,
)

# Our own pixel limit is applied from the header before any decoding; Pillow's global
# guard would otherwise refuse (or warn about) images the configured limit allows.
Image.MAX_IMAGE_PIXELS = None
MAX_SIDE = 65535
_OPENERS = [t.decoders[0] for t in ACCEPTED]
_heif_registered = False


class UploadRejectedError(Exception):
    """An upload is refused; ``status`` is the HTTP status to answer, ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    max_pixels: int
    max_frames: int

    @classmethod
    def from_settings(cls, ingest: IngestSettings) -> Limits:
        return cls(ingest.max_bytes, ingest.max_pixels, ingest.max_frames)


@dataclass(frozen=True, slots=True)
class Checked:
    kind: MediaType
    width: int
    height: int
    frames: int


def open_image(fp: IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to the accepted formats (HEIC through pillow-heif)."""
    global _heif_registered
    if not _heif_registered:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        _heif_registered = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(fp, formats=_OPENERS)


def check_head(head: bytes) -> MediaType:
    """The type the first bytes of an upload announce; raise if none is accepted."""
    if not head:
        raise UploadRejectedError(422, "the file is empty")
    kind = sniff(head)
    if kind is None:
        raise UploadRejectedError(
            415,
            f"not a supported image (content sniffed from its bytes); accepted: {accepted_names()}",
        )
    return kind


def check_dimensions(width: int, height: int, frames: int, limits: Limits) -> None:
    if width <= 0 or height <= 0 or width > MAX_SIDE or height > MAX_SIDE:
        raise UploadRejectedError(
            422, f"absurd dimensions {width}x{height} (each side must be 1 to {MAX_SIDE})"
        )
    if width * height > limits.max_pixels:
        raise UploadRejectedError(
            422,
            f"{width}x{height} is {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (a decompression bomb, or a very large image)",
        )
    if frames > limits.max_frames:
        raise UploadRejectedError(
            422, f"the animation has {frames:,} frames, over the limit of {limits.max_frames:,}"
        )


def check_file(fp: IO[bytes], limits: Limits) -> Checked:
    """Check a complete upload; raise :class:`UploadRejectedError` saying what is wrong."""
    fp.seek(0)
    kind = check_head(fp.read(SNIFF_BYTES))
    fp.seek(0)
    try:
        with open_image(fp) as img:
            if BY_DECODER.get(img.format or "") is not kind:
                raise UploadRejectedError(
                    415, f"the bytes start like {kind.name} but decode as {img.format or 'nothing'}"
                )
            width, height = img.size
            check_dimensions(width, height, 1, limits)
            frames = int(getattr(img, "n_frames", 1))
            check_dimensions(width, height, frames, limits)
            img.seek(0)
            if kind is JPEG:
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except UploadRejectedError:
        raise
    except UnidentifiedImageError:
        raise UploadRejectedError(
            422, f"corrupt or truncated {kind.name}: its header cannot be read"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise UploadRejectedError(422, f"corrupt or truncated {kind.name}: {exc}") from None
    except Exception as exc:  # a decoder plugin failing in its own way on hostile input
        raise UploadRejectedError(
            422, f"corrupt {kind.name} ({type(exc).__name__}: {exc})"
        ) from None
    return Checked(kind, width, height, frames)
