"""ingest's image work on real files: normalisation, renditions, hashes, EXIF, and the
upload checks, with no servers involved."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import ExifTags, Image

from bus.core.settings import IngestSettings
from bus.images.check import Limits, UploadRejectedError, check_file
from bus.intake.gpsstrip import strip_jpeg_gps
from functions.ingest import placeholder
from functions.ingest.imaging import BadImageError, Derived, Options, derive, phash
from tests.support import corpus
from tests.support.images import jpeg, png

OPTIONS = Options.from_settings(IngestSettings())
LIMITS = Limits.from_settings(IngestSettings())


def rendition(derived: Derived, name: str) -> Image.Image:
    [found] = [r for r in derived.renditions if r.name == name]
    img = Image.open(io.BytesIO(found.data))
    assert img.format == "WEBP" and img.size == (found.width, found.height)
    return img


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=False))


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def test_a_large_jpeg_gets_every_rendition_from_a_reduced_decode() -> None:
    photo = jpeg(4000, 3000, (30, 90, 160))
    derived = derive(photo, OPTIONS)
    sizes = {r.name: (r.width, r.height) for r in derived.renditions}
    # 4000 px decodes at 1/2 scale (2000 px): that is the display, no resize needed.
    assert sizes == {"display": (2000, 1500), "thumb-1024": (1024, 768), "thumb-256": (256, 192)}
    info = derived.info
    assert (info["width"], info["height"], info["format"]) == (4000, 3000, "JPEG")
    assert len(info["blurhash"]) == 28 and len(info["phash"]) == 16
    assert close(rendition(derived, "thumb-256").convert("RGB").getpixel((9, 9)), (30, 90, 160))


def test_display_size_is_capped_and_small_images_are_never_enlarged() -> None:
    big = derive(png(3000, 1000), OPTIONS)
    assert (big.renditions[0].width, big.renditions[0].height) == (2048, 683)
    small = derive(jpeg(200, 100), OPTIONS)
    assert {(r.width, r.height) for r in small.renditions} == {(200, 100)}


def test_exif_orientation_is_applied() -> None:
    derived = derive(corpus.exif_rotated_jpeg(6), OPTIONS)
    assert (derived.info["width"], derived.info["height"]) == (600, 800)
    display = rendition(derived, "display").convert("RGB")
    assert display.size == (600, 800)
    # Stored left (red) is on top once turned 90 degrees clockwise.
    assert close(display.getpixel((300, 100)), (220, 20, 20), 30)
    assert close(display.getpixel((300, 700)), (20, 20, 220), 30)
    assert derived.info["orientation"] == 6


def test_cmyk_jpeg_becomes_rgb() -> None:
    derived = derive(corpus.cmyk_jpeg(), OPTIONS)
    assert derived.info["source"]["mode"] == "CMYK"
    pixel = rendition(derived, "thumb-256").convert("RGB").getpixel((50, 50))
    assert close(pixel, (255, 0, 0), 30)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    grey = derive(corpus.png16_grey(40000), OPTIONS)
    assert grey.info["source"]["mode"] == "I;16"
    assert close(rendition(grey, "thumb-256").convert("RGB").getpixel((5, 5)), (156, 156, 156), 3)
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("F").point(lambda v: v / 510)
    floats = io.BytesIO()
    ramp.save(floats, "TIFF")  # 32-bit float samples from 0 to 0.5
    stretched = rendition(derive(floats.getvalue(), OPTIONS), "display").convert("L")
    low, high = stretched.getextrema()
    assert low <= 4 and high >= 250, (low, high)
    rgb = derive(corpus.png16_rgb(), OPTIONS)
    assert close(rendition(rgb, "thumb-256").convert("RGB").getpixel((5, 5)), (234, 117, 4), 6)


def test_palette_transparency_is_kept_and_opaque_alpha_is_dropped() -> None:
    derived = derive(corpus.palette_png_with_transparency(), OPTIONS)
    thumb = rendition(derived, "thumb-256")
    assert derived.info["has_alpha"] and thumb.mode == "RGBA"
    assert thumb.getpixel((10, 10))[3] == 255 and thumb.getpixel((50, 10))[3] == 0
    assert not derive(png(color=(1, 2, 3, 255)), OPTIONS).info["has_alpha"]


def test_embedded_profiles_are_converted_to_srgb() -> None:
    srgb = derive(corpus.tagged_rgb_png("sRGB"), OPTIONS)
    assert "sRGB" in srgb.info["color_profile"]
    assert close(rendition(srgb, "display").convert("RGB").getpixel((5, 5)), (60, 180, 80), 4)
    wide = derive(corpus.tagged_rgb_png("wide"), OPTIONS)
    assert wide.info["color_profile"] == "darkroom test wide gamut"
    converted = rendition(wide, "display").convert("RGB").getpixel((5, 5))
    # Wide-gamut green is greener than sRGB can say: red drops to nothing.
    assert close(converted, (0, 185, 62), 8), converted


def test_animated_gif_uses_the_first_frame_and_counts_frames() -> None:
    derived = derive(corpus.animated_gif(3), OPTIONS)
    assert derived.info["source"]["frames"] == 3
    assert close(rendition(derived, "display").convert("RGB").getpixel((5, 5)), (255, 0, 0), 8)
    few = dataclasses.replace(OPTIONS, limits=dataclasses.replace(LIMITS, max_frames=2))
    with pytest.raises(BadImageError, match="3 frames, over the limit of 2"):
        derive(corpus.animated_gif(3), few)


def test_a_gif_cut_inside_its_second_frame_is_refused_not_crashed() -> None:
    """Found by the property tests: Pillow raises struct.error counting such frames."""
    cut = corpus.animated_gif(2)[:233]
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        derive(cut, OPTIONS)
    with pytest.raises(UploadRejectedError):
        check_file(io.BytesIO(cut), LIMITS)


def test_multi_picture_jpegs_are_jpegs() -> None:
    checked = check_file(io.BytesIO(corpus.mpo_jpeg()), LIMITS)
    assert checked.kind.name == "JPEG" and checked.frames == 2
    derived = derive(corpus.mpo_jpeg(), OPTIONS)
    assert close(rendition(derived, "display").convert("RGB").getpixel((9, 9)), (200, 30, 30))


@pytest.mark.parametrize(("make", "fmt"), [(corpus.heic, "HEIF"), (corpus.avif, "AVIF")])
def test_heic_and_avif_are_supported(make: object, fmt: str) -> None:
    assert callable(make)
    data = make()
    assert check_file(io.BytesIO(data), LIMITS).width == 320
    derived = derive(data, OPTIONS)
    assert derived.info["format"] == fmt
    assert rendition(derived, "thumb-256").size == (256, 192)


def test_exif_summary_and_no_gps_in_renditions() -> None:
    derived = derive(corpus.camera_jpeg(), OPTIONS)
    exif = derived.info["exif"]
    assert exif["camera"] == "Canon EOS R5"
    assert exif["lens"] == "RF24-70mm F2.8 L IS USM"
    assert exif["taken_at"] == "2024-06-01T18:30:05+02:00"
    assert exif["f_number"] == 2.8 and exif["iso"] == 400
    assert exif["had_gps"] is True and "gps" not in str(exif).replace("had_gps", "")
    for r in derived.renditions:
        out = Image.open(io.BytesIO(r.data))
        assert not out.getexif() and "exif" not in out.info and b"GPS" not in r.data


def test_blurhash_matches_the_reference_encoder() -> None:
    """Expected strings were produced by the C reference implementation."""
    img = Image.open(io.BytesIO(corpus.exif_rotated_jpeg(1))).convert("RGB").resize((32, 24))
    assert placeholder.encode(img, 4, 3) == "L^Il@M|TsRJqo3n~jsa}fQfQfQfQ"
    flat = Image.new("RGB", (20, 32), (10, 200, 30))
    assert placeholder.encode(flat, 4, 3) == "L91JlBlzfQlzlNf%fQf%fQfQfQfQ"
    assert len(placeholder.encode(img, 9, 9)) == 6 + 2 * 80


def test_perceptual_hash_survives_rescaling_and_tells_images_apart() -> None:
    photo = Image.open(io.BytesIO(corpus.exif_rotated_jpeg(1))).convert("RGB")
    photo.paste((250, 240, 10), (100, 100, 300, 250))
    smaller = photo.resize((333, 250))
    recompressed = io.BytesIO()
    smaller.save(recompressed, "JPEG", quality=40)
    again = Image.open(io.BytesIO(recompressed.getvalue()))
    assert hamming(phash(photo), phash(again)) <= 8
    other = photo.transpose(Image.Transpose.ROTATE_180)
    assert hamming(phash(photo), phash(other)) >= 16


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"", 422, "empty"),
        (corpus.text_as_jpeg(), 415, "not a supported image"),
        (corpus.truncated_jpeg(), 422, "corrupt or truncated JPEG"),
        (corpus.png_header_only(100_000, 100_000), 422, "absurd dimensions 100000x100000"),
        (corpus.png_header_only(60_000, 60_000), 422, "3,600,000,000 pixels, over the limit"),
        (corpus.png_header_only(0, 50), 422, ""),
        (b"\xff\xd8\xff\xe0" + b"\0" * 64, 422, "JPEG"),
        (b"GIF89a" + b"\xff" * 20, 422, "GIF"),
    ],
    ids=["empty", "text", "truncated", "100k", "bomb", "zero-width", "jpeg-garbage", "gif-garbage"],
)
def test_check_file_refuses_bad_files(data: bytes, status: int, reason: str) -> None:
    with pytest.raises(UploadRejectedError) as caught:
        check_file(io.BytesIO(data), LIMITS)
    assert caught.value.status == status and reason in caught.value.reason


def test_check_file_reads_limits_from_the_header_alone() -> None:
    checked = check_file(io.BytesIO(corpus.animated_gif(5)), LIMITS)
    assert (checked.kind.name, checked.frames) == ("GIF", 5)
    tight = dataclasses.replace(LIMITS, max_pixels=1000)
    with pytest.raises(UploadRejectedError, match="over the limit of 1,000"):
        check_file(io.BytesIO(jpeg(100, 100)), tight)


@pytest.mark.parametrize(
    "make",
    [
        corpus.cmyk_jpeg,
        corpus.png16_grey,
        corpus.png16_rgb,
        corpus.exif_rotated_jpeg,
        corpus.animated_gif,
        corpus.palette_png_with_transparency,
    ],
)
def test_check_file_accepts_awkward_but_valid_files(make: object) -> None:
    assert callable(make)
    assert check_file(io.BytesIO(make()), LIMITS).width > 0


def test_gps_is_stripped_from_a_jpeg_original_losslessly() -> None:
    original = corpus.camera_jpeg()
    out = io.BytesIO()
    assert strip_jpeg_gps(io.BytesIO(original), out) is True
    stripped = Image.open(io.BytesIO(out.getvalue()))
    exif = stripped.getexif()
    assert not exif.get_ifd(ExifTags.IFD.GPSInfo) and exif[ExifTags.Base.Model] == "Canon EOS R5"
    assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.LensModel] == "RF24-70mm F2.8 L IS USM"
    assert stripped.tobytes() == Image.open(io.BytesIO(original)).tobytes()
    untouched = io.BytesIO()
    assert strip_jpeg_gps(io.BytesIO(jpeg()), untouched) is False
    assert untouched.getvalue() == jpeg()


def test_an_unreadable_exif_block_is_dropped_when_stripping_gps() -> None:
    garbage = b"Exif\0\0" + b"\x13\x37not a tiff header at all"
    app1 = b"\xff\xe1" + (len(garbage) + 2).to_bytes(2, "big") + garbage
    original = jpeg()
    damaged = original[:2] + app1 + original[2:]
    out = io.BytesIO()
    assert strip_jpeg_gps(io.BytesIO(damaged), out) is True
    assert b"Exif\0\0" not in out.getvalue() and out.getvalue() == original
