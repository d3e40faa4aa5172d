"""Awkward and hostile image files, generated in memory, for ingest's tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageCms

from tests.support.images import jpeg


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``x``height`` but holds almost no pixels (a bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    return jpeg(800, 600)[:-400]


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """Pure red ink-wise: no cyan, full magenta and yellow."""
    out = io.BytesIO()
    Image.new("CMYK", (320, 240), cmyk).save(out, "JPEG", quality=95)
    return out.getvalue()


def png16_grey(level: int = 40000) -> bytes:
    out = io.BytesIO()
    Image.new("I;16", (300, 200), level).save(out, "PNG")
    return out.getvalue()


def png16_rgb(width: int = 96, height: int = 64) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one, so it is built by hand)."""
    row = b"".join(struct.pack(">HHH", 60000, 30000, 1000) for _ in range(width))
    raw = b"".join(b"\0" + row for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def mpo_jpeg() -> bytes:
    """A JPEG with a second picture after the first (MPO, as stereo and dual-camera phones
    write): red first, blue second."""
    first, second = Image.new("RGB", (320, 240), (200, 30, 30)), Image.new("RGB", (320, 240))
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second])
    return out.getvalue()


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """800x600 as stored: left half red, right half blue; EXIF says how to turn it."""
    img = Image.new("RGB", (800, 600), (220, 20, 20))
    img.paste((20, 20, 220), (400, 0, 800, 600))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def camera_jpeg(quality: int = 75) -> bytes:
    """A JPEG with camera EXIF and a GPS position."""
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R5"
    sub = exif.get_ifd(0x8769)
    sub[0xA434] = "RF24-70mm F2.8 L IS USM"
    sub[0x9003] = "2024:06:01 18:30:05"
    sub[0x9011] = "+02:00"
    sub[0x829D] = 2.8
    sub[0x8827] = 400
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 140, 60)).save(out, "JPEG", exif=exif, quality=quality)
    return out.getvalue()


def animated_gif(frames: int = 3) -> bytes:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (120, 80), colours[i % 3]) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return out.getvalue()


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 32, 64))
    out = io.BytesIO()
    img.save(out, "PNG", transparency=0)
    return out.getvalue()


def heic(color: tuple[int, int, int] = (30, 160, 90)) -> bytes:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    out = io.BytesIO()
    Image.new("RGB", (320, 240), color).save(out, "HEIF", quality=80)
    return out.getvalue()


def avif(color: tuple[int, int, int] = (160, 30, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), color).save(out, "AVIF", quality=80)
    return out.getvalue()


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def wide_gamut_icc() -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile with wide primaries (D50-adapted
    Display P3 primaries, gamma 2.2): enough for lcms to build a real transform."""
    tags = {
        b"desc": b"desc\0\0\0\0"
        + struct.pack(">I", 25)
        + b"darkroom test wide gamut\0"
        + b"\0" * 4
        + b"\0" * 2
        + b"\0"
        + b"\0" * 67,
        b"wtpt": _xyz_tag(0.9642, 1.0, 0.8249),
        b"rXYZ": _xyz_tag(0.5151, 0.2412, -0.0011),
        b"gXYZ": _xyz_tag(0.2920, 0.6922, 0.0419),
        b"bXYZ": _xyz_tag(0.1571, 0.0666, 0.7841),
        b"rTRC": b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0",
    }
    tags[b"gTRC"] = tags[b"bTRC"] = tags[b"rTRC"]
    table = b""
    body = b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, data in tags.items():
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data + b"\0" * (-len(data) % 4)
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + b"mntr"
        + b"RGB "
        + b"XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 0)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
    )
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def tagged_rgb_png(profile: str) -> bytes:
    """Green pixels tagged with the "sRGB" profile or the "wide" one above."""
    if profile == "wide":
        icc = wide_gamut_icc()
    else:
        icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (60, 180, 80)).save(out, "PNG", icc_profile=icc)
    return out.getvalue()


def text_as_jpeg() -> bytes:
    return b"this is a shopping list, not a photo\nmilk\neggs\n" * 10
