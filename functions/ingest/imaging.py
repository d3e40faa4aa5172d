"""Pure image work for ingest: normalise an original and derive its renditions and hashes.

Runs in the CPU executor, never on the event loop. Where the time goes, and why the steps
are ordered as they are (see ``tests/bench/bench_ingest.py`` for the figures):

- A JPEG is decoded at the coarsest DCT scale that still leaves at least 3/4 of the display
  size on the long edge (libjpeg decodes at 1/2, 1/4, 1/8 for a fraction of the cost).
- Other formats cannot decode smaller: the full-size decode is shrunk by an integer factor
  a strip at a time, so it is the only full-size image ever held. :func:`decode_cost`
  says what that peak is, for the handler to fit concurrent decodes in the process's
  decode budget (:mod:`bus.images.budget`).
- Colour work (mode, ICC to sRGB) and the EXIF rotation happen on that reduced image, never
  on the full-size original.
- Each smaller rendition is resized from the previous one, not from the original.
- WebP is encoded with a fast method: encoding dominates once decoding is cheap.
"""

from __future__ import annotations

import hashlib
import io
import math
import statistics
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, TypeVar, cast

from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

from bus.core.settings import IngestSettings
from bus.images.check import Limits, UploadRejectedError, bomb_reason, open_image
from bus.images.media import JPEG
from functions.ingest import placeholder

T = TypeVar("T")
DRAFT_FRACTION = 0.75  # decode no smaller than this share of the display size
STRIP_PIXELS = 1 << 22  # pixels converted at a time while shrinking a full-size decode
_SHRUNK_COPIES = 4  # the shrunk image, its colour conversions, the display and thumbnails
# Decoders that decode into buffers of their own first: how many more full-size RGBA copies
# each holds at its peak (measured: 40 MP WebP 611 MB; 24 MP AVIF 211 MB, HEIC 167 MB).
_DECODER_BUFFERS = {"WEBP": 3, "AVIF": 2, "HEIF": 1}
WEBP_METHOD = 0  # 0 fastest .. 6 smallest; 0 encoded 2.4x faster than 4 at about the same size
PLACEHOLDER_PX = 32  # blurhash input: more pixels change nothing visible
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SRGB = ImageCms.createProfile("sRGB")
_TEXT_CHARS = 120


class BadImageError(ValueError):
    """The original cannot be turned into renditions; the message says why."""


@dataclass(frozen=True, slots=True)
class Options:
    display_px: int
    thumb_px: tuple[int, ...]
    quality: int
    limits: Limits
    method: int = WEBP_METHOD

    @classmethod
    def from_settings(cls, ingest: IngestSettings) -> Options:
        return cls(
            display_px=ingest.display_px,
            thumb_px=ingest.thumb_px,
            quality=ingest.webp_quality,
            limits=Limits.from_settings(ingest),
        )


@dataclass(frozen=True, slots=True)
class Rendition:
    name: str  # "display" or "thumb-<px>"
    width: int
    height: int
    data: bytes

    @property
    def filename(self) -> str:
        return f"{self.name}.webp"


@dataclass(frozen=True, slots=True)
class Derived:
    info: dict[str, Any]  # what ingest.json records, apart from the object keys
    renditions: list[Rendition]  # largest first


def derive(data: bytes, options: Options) -> Derived:
    """Normalise ``data`` and derive every rendition; raise :class:`BadImageError`."""
    with _refusing():
        return _derive(data, options)


def decode_cost(data: bytes, options: Options) -> int:
    """Bytes :func:`derive` holds at its peak for ``data``, estimated from the header alone.

    The full-size decode (in Pillow's layout: RGB takes 4 bytes a pixel), the buffers of
    decoders that decode outside Pillow, the strips being shrunk, and the shrunk image
    with its colour conversions and renditions. Raise :class:`BadImageError` where
    ``derive`` would refuse the header.
    """
    with _refusing():
        if not data:
            raise BadImageError("the file is empty")
        with open_image(io.BytesIO(data), options.limits) as img:
            fmt = img.format or ""
            if fmt in JPEG.decoders:
                img.draft(img.mode, _draft_size(*img.size, options.display_px))
            width, height = img.size  # after draft: what libjpeg will actually decode
            mode = img.mode
    pixels = width * height
    decoded = pixels * (_pixel_bytes(mode) + 4 * _DECODER_BUFFERS.get(fmt, 0))
    factor = _shrink_factor(width, height, options.display_px)
    shrunk = math.ceil(width / factor) * math.ceil(height / factor) * 4
    strips = STRIP_PIXELS * 4 * 3 if factor > 1 else 0  # a strip, converted, reduced
    return decoded + strips + _SHRUNK_COPIES * shrunk


@contextmanager
def _refusing() -> Iterator[None]:
    """Turn whatever a decoder raises on hostile input into :class:`BadImageError`."""
    try:
        yield
    except (BadImageError, MemoryError):
        raise
    except UploadRejectedError as exc:
        raise BadImageError(exc.reason) from None
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(bomb_reason(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise BadImageError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # a decoder plugin failing in its own way on hostile input
        raise BadImageError(f"corrupt image ({type(exc).__name__}: {exc})") from None


def _derive(data: bytes, options: Options) -> Derived:
    if not data:
        raise BadImageError("the file is empty")
    with open_image(io.BytesIO(data), options.limits) as img:
        fmt = img.format or "unknown"
        width, height = img.size
        frames = int(getattr(img, "n_frames", 1))
        exif = img.getexif()
        orientation = int(exif.get(ExifTags.Base.Orientation, 1) or 1)
        icc = img.info.get("icc_profile")
        source_mode = img.mode
        if fmt in JPEG.decoders:
            img.draft(img.mode, _draft_size(width, height, options.display_px))
        img.seek(0)
        img.load()
        # Shrunk before the file closes: closing releases the full-size decode, and no
        # second full-size image is ever made.
        shrunk = _shrink(img, _shrink_factor(*img.size, options.display_px))
    colour, profile = _to_srgb(shrunk, icc if isinstance(icc, bytes) else None)
    display = _fit(colour, options.display_px)
    if orientation in _TRANSPOSE:
        display = display.transpose(_TRANSPOSE[orientation])
    renditions = [_encode("display", display, options)]
    current = display
    for px in options.thumb_px:
        current = _fit(current, px)
        renditions.append(_encode(f"thumb-{px}", current, options))
    flat = _flatten(current)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    info: dict[str, Any] = {
        "format": fmt,
        "width": upright[0],
        "height": upright[1],
        "source": {"width": width, "height": height, "mode": source_mode, "frames": frames},
        "orientation": orientation,
        "color_profile": profile,
        "has_alpha": display.mode == "RGBA",
        "blurhash": _blurhash(flat),
        "phash": phash(flat),
        "exif": exif_summary(exif),
    }
    return Derived(info, renditions)


def _draft_size(width: int, height: int, display_px: int) -> tuple[int, int]:
    """The smallest size libjpeg may decode to without starving the display rendition."""
    scale = min(1.0, display_px * DRAFT_FRACTION / max(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _shrink_factor(width: int, height: int, display_px: int) -> int:
    """The integer factor a decode is shrunk by before any colour work: the most that
    leaves at least the display size on the long edge."""
    return max(1, max(width, height) // display_px)


def _shrink(img: Image.Image, factor: int) -> Image.Image:
    """``img`` in 8 bits (:func:`_eight_bit`), box-averaged down by ``factor``: a new image.

    Converted and reduced a strip at a time, so the only full-size image is the decode.
    (Alpha is premultiplied while averaging: Pillow's ``reduce`` does that for RGBA.)
    """
    if factor == 1:  # small: the display or at most twice it on the long edge
        converted = _eight_bit(img)
        return converted.copy() if converted is img else converted
    extrema = cast(tuple[float, float], img.getextrema()) if img.mode == "F" else None
    width, height = img.size
    rows = max(1, STRIP_PIXELS // width // factor) * factor  # whole blocks of rows
    out: Image.Image | None = None
    for top in range(0, height, rows):
        strip = _eight_bit(img.crop((0, top, width, min(height, top + rows))), extrema)
        small = strip.reduce(factor)
        if out is None:
            out = Image.new(small.mode, (math.ceil(width / factor), math.ceil(height / factor)))
        out.paste(small, (0, top // factor))
    assert out is not None  # height >= 1
    return out


def _pixel_bytes(mode: str) -> int:
    """Bytes a pixel takes in Pillow's memory (three 8-bit bands take four)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _fit(img: Image.Image, px: int) -> Image.Image:
    """``img`` scaled to fit in ``px``x``px`` (never enlarged)."""
    long_edge = max(img.size)
    if long_edge <= px:
        return img
    scale = px / long_edge
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _encode(name: str, img: Image.Image, options: Options) -> Rendition:
    out = io.BytesIO()
    # No EXIF or ICC goes out: pixels are sRGB already, and GPS must not leak.
    img.save(out, "WEBP", quality=options.quality, method=options.method)
    return Rendition(name, img.width, img.height, out.getvalue())


# --- colour -------------------------------------------------------------------------------
def _to_srgb(img: Image.Image, icc: bytes | None) -> tuple[Image.Image, str | None]:
    """8-bit RGB or RGBA in sRGB, and the name of the embedded profile (if any)."""
    img = _eight_bit(img)
    profile_name = None
    if icc:
        try:
            profile_name = _profile_name(icc)
        except (OSError, ImageCms.PyCMSError):
            profile_name = None  # an unreadable profile: treat the pixels as sRGB
    target = "RGBA" if img.mode == "RGBA" else "RGB"
    wide = profile_name is not None and not _is_srgb(profile_name)
    if wide and icc and img.mode in ("RGB", "RGBA", "CMYK"):
        try:
            transform = _transform(icc, img.mode, "RGB" if img.mode == "CMYK" else img.mode)
        except ImageCms.PyCMSError:
            profile_name = f"{profile_name} (unusable, pixels taken as sRGB)"
        else:
            img = ImageCms.applyTransform(img, transform) or img
    if img.mode != target:
        img = img.convert(target)
    if target == "RGBA" and img.getchannel("A").getextrema() == (255, 255):
        img = img.convert("RGB")  # an opaque alpha channel only costs bytes
    return img, profile_name


def _eight_bit(img: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Bring 16-bit, 32-bit and float greyscale down to 8 bits without clipping.

    Float images are stretched from ``extrema`` (the whole image's, when ``img`` is a strip
    of it) or else their own.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "F":
        low, high = extrema or cast(tuple[float, float], img.getextrema())
        span = (high - low) or 1.0
        return img.point(lambda v: (v - low) * (255 / span)).convert("L")
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("PA", "LA", "La", "RGBa"):
        return img.convert("RGBA")
    if img.mode in ("1", "L", "YCbCr", "HSV"):
        return img.convert("RGB")
    if img.mode == "LAB":
        lab = ImageCms.buildTransform(ImageCms.createProfile("LAB"), _SRGB, "LAB", "RGB")
        return ImageCms.applyTransform(img, lab) or img
    if img.mode in ("RGB", "RGBA", "CMYK"):
        return img
    raise BadImageError(f"unsupported colour mode {img.mode}")


class _ProfileCache(Generic[T]):
    """What is built from ICC profiles (names, transforms), least recently used dropped
    first, keyed by each profile's SHA-256 and never by the profile: an uploaded profile can
    be megabytes, and a cache keyed by the bytes would keep every one of them alive."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Hashable, ...], T] = OrderedDict()
        self._lock = threading.Lock()  # ingest runs on several executor threads

    def get(self, key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()  # outside the lock; two threads may build the same value once each
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def keys(self) -> list[tuple[Hashable, ...]]:
        with self._lock:
            return list(self._items)


_PROFILE_NAMES: _ProfileCache[str] = _ProfileCache(64)
_TRANSFORMS: _ProfileCache[ImageCms.ImageCmsTransform] = _ProfileCache(32)


def _profile_name(icc: bytes) -> str:
    def build() -> str:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.getProfileDescription(profile).strip() or "unnamed profile"

    return _PROFILE_NAMES.get((hashlib.sha256(icc).digest(),), build)


def _is_srgb(name: str) -> bool:
    return "srgb" in name.lower().replace(" ", "")


def _transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform:
    def build() -> ImageCms.ImageCmsTransform:
        # NOCACHE: lcms's per-transform pixel cache is not safe across threads.
        return ImageCms.buildTransform(
            ImageCms.ImageCmsProfile(io.BytesIO(icc)),
            _SRGB,
            in_mode,
            out_mode,
            renderingIntent=ImageCms.Intent.PERCEPTUAL,
            flags=ImageCms.Flags.NOCACHE,
        )

    return _TRANSFORMS.get((hashlib.sha256(icc).digest(), in_mode, out_mode), build)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (for the hashes)."""
    if img.mode != "RGBA":
        return img
    white = Image.new("RGB", img.size, (255, 255, 255))
    white.paste(img, mask=img.getchannel("A"))
    return white


# --- placeholders and hashes ----------------------------------------------------------------
def _blurhash(img: Image.Image) -> str:
    small = _fit(img, PLACEHOLDER_PX)
    x, y = (4, 3) if small.width >= small.height else (3, 4)
    return placeholder.encode(small, x, y)


@lru_cache(maxsize=1)
def _dct_rows() -> tuple[tuple[float, ...], ...]:
    return tuple(
        tuple(math.cos(math.pi * (2 * x + 1) * u / 64) for x in range(32)) for u in range(8)
    )


def phash(img: Image.Image) -> str:
    """A 64-bit perceptual hash (DCT of a 32x32 grey image, 8x8 lowest frequencies).

    Near-identical images (rescaled, recompressed) differ in a few bits; compare with the
    Hamming distance of the two hex strings.
    """
    grey = img.convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    pixels = grey.tobytes()
    rows = _dct_rows()
    # Separable 2-D DCT-II, computing only the 8x8 low-frequency corner.
    partial = [
        [sum(pixels[y * 32 + x] * rows[u][x] for x in range(32)) for u in range(8)]
        for y in range(32)
    ]
    coeffs = [
        sum(partial[y][u] * rows[v][y] for y in range(32)) for v in range(8) for u in range(8)
    ]
    median = statistics.median(coeffs[1:])  # the DC term says only how bright it is
    bits = 0
    for c in coeffs:
        bits = (bits << 1) | (c > median)
    return f"{bits:016x}"


# --- EXIF ---------------------------------------------------------------------------------
def exif_summary(exif: Image.Exif) -> dict[str, Any]:
    """Camera, lens, date taken and exposure; only whether GPS was present, never where."""
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    make = _text(exif.get(ExifTags.Base.Make))
    model = _text(exif.get(ExifTags.Base.Model))
    camera = (
        model
        if make and model and model.lower().startswith(make.lower())
        else " ".join(p for p in (make, model) if p)
    )
    summary: dict[str, Any] = {
        "camera": camera or None,
        "lens": _text(sub.get(ExifTags.Base.LensModel)),
        "taken_at": _taken_at(
            sub.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime),
            sub.get(ExifTags.Base.OffsetTimeOriginal),
        ),
        "exposure_s": _number(sub.get(ExifTags.Base.ExposureTime)),
        "f_number": _number(sub.get(ExifTags.Base.FNumber)),
        "iso": _number(sub.get(ExifTags.Base.ISOSpeedRatings)),
        "focal_length_mm": _number(sub.get(ExifTags.Base.FocalLength)),
        "software": _text(exif.get(ExifTags.Base.Software)),
        "had_gps": bool(exif.get_ifd(ExifTags.IFD.GPSInfo)),
    }
    return {k: v for k, v in summary.items() if v not in (None, "")}


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    cleaned = "".join(ch for ch in value if ch.isprintable()).strip()
    return cleaned[:_TEXT_CHARS] or None


def _number(value: Any) -> float | None:
    if isinstance(value, tuple) and value:
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return round(number, 6) if math.isfinite(number) else None


def _taken_at(value: Any, offset: Any) -> str | None:
    text = _text(value)
    if not text or len(text) < 19 or text[4] != ":" or text[10] != " ":
        return None
    date, clock = text[:10].replace(":", "-"), text[11:19]
    if not (date.replace("-", "").isdigit() and clock.replace(":", "").isdigit()):
        return None
    if date.startswith("0000"):
        return None
    zone = _text(offset)
    suffix = zone if zone and len(zone) == 6 and zone[0] in "+-" and zone[3] == ":" else ""
    return f"{date}T{clock}{suffix}"
