"""Deciding whether uploaded bytes are an image darkroom accepts, before anything is stored.

Two steps, both on the bytes alone (never the file name or the client's content type):
:func:`check_head` sniffs the first bytes as they arrive, so a wrong type is refused before
the rest of the body is read; :func:`check_file` then opens the complete file, checks the
dimensions and frame count from the header (before any pixel is decoded, so a decompression
bomb costs nothing) and decodes the first frame, at 1/8 scale for JPEG, to catch truncated
and corrupt files. It runs in an executor: it is CPU work.

Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is process-wide and is
left as Pillow sets it, for every other user of Pillow in the process (the model functions
among them). darkroom's limit is the explicit check in :func:`open_image`, made from the
header before any pixel is decoded.
"""

from __future__ import annotations

import struct
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

MAX_SIDE = 65535
_OPENERS = [t.decoders[0] for t in ACCEPTED]
_PREFIX_BYTES = 16  # what Pillow's format checks look at
_decoders_registered = False


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


def open_image(fp: IO[bytes], limits: Limits) -> Image.Image:
    """The image in ``fp``, its header read by an accepted decoder only, and its dimensions
    and frame count checked against ``limits`` before any pixel is decoded.

    ``Image.open`` would first apply Pillow's process-wide guard to the header, refusing
    images over twice ``Image.MAX_IMAGE_PIXELS`` that ``limits.max_pixels`` may allow, and
    warning about smaller ones. So the decoders are called here as ``Image.open`` calls
    them, and ``limits`` is the check that decides. (A few decoders apply Pillow's guard
    again while decoding frames; see :func:`bomb_reason`.)
    """
    _register_decoders()
    fp.seek(0)
    prefix = fp.read(_PREFIX_BYTES)
    for name in _OPENERS:
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept is not None else True
        if not verdict or isinstance(verdict, str):  # a string is Pillow's "almost, but no"
            continue
        fp.seek(0)
        try:
            img = factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format after all (what Image.open does too)
        try:
            width, height = img.size
            check_dimensions(width, height, 1, limits)  # before frames are counted
            check_dimensions(width, height, int(getattr(img, "n_frames", 1)), limits)
        except BaseException:
            img.close()
            raise
        return img
    raise UnidentifiedImageError("cannot identify the image file")


def bomb_reason(exc: Image.DecompressionBombError) -> str:
    """Why Pillow's own guard refused a frame that ``ingest.max_pixels`` allowed.

    TIFF, GIF and MPO decoders check each frame against ``Image.MAX_IMAGE_PIXELS`` (twice
    it is an error) whatever the caller allowed; that global is Pillow's, left alone.
    """
    return (
        f"{exc} (Pillow's own limit for this format's frames, twice "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,})"
    )


def _register_decoders() -> None:
    """Load Pillow's decoder plugins, and pillow-heif's for HEIC (once)."""
    global _decoders_registered
    if not _decoders_registered:
        from pillow_heif import register_heif_opener

        Image.init()
        register_heif_opener()
        _decoders_registered = True


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
        with open_image(fp, limits) as img:
            if BY_DECODER.get(img.format or "") is not kind:
                raise UploadRejectedError(
                    415, f"the bytes start like {kind.name} but decode as {img.format or 'nothing'}"
                )
            width, height = img.size
            frames = int(getattr(img, "n_frames", 1))
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
    except Image.DecompressionBombError as exc:
        raise UploadRejectedError(422, bomb_reason(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise UploadRejectedError(422, f"corrupt or truncated {kind.name}: {exc}") from None
    except Exception as exc:  # a decoder plugin failing in its own way on hostile input
        raise UploadRejectedError(
            422, f"corrupt {kind.name} ({type(exc).__name__}: {exc})"
        ) from None
    return Checked(kind, width, height, frames)
