"""Small leaks: GPS kept in the later pictures of an MPO, uploaded ICC profiles pinned in
memory by the transform caches, and private files written with a leftover's mode."""

from __future__ import annotations

import dataclasses
import gc
import io
import stat
import struct
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from PIL.MpoImagePlugin import MpoImageFile

from bus.core.settings import IngestSettings
from bus.images.check import UploadRejectedError
from bus.intake.accept import accept_upload
from bus.intake.gpsstrip import strip_jpeg_gps
from bus.ops.local import write_private
from bus.runtime.context import Context
from functions.ingest import imaging
from functions.ingest.imaging import Options, derive
from tests.support import corpus

OPTIONS = Options.from_settings(IngestSettings())


def located(model: str) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Model] = model
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 29.0)
    return exif


def stereo_mpo() -> bytes:
    """Two pictures, each with its own EXIF and GPS position, as a stereo camera writes."""
    left = Image.new("RGB", (320, 240), (200, 30, 30))
    right = Image.new("RGB", (320, 240), (30, 30, 200))
    right.encoderinfo = {"exif": located("right eye")}  # Pillow saves frame 2 with these
    out = io.BytesIO()
    left.save(out, "MPO", save_all=True, append_images=[right], exif=located("left eye"))
    return out.getvalue()


def frames(data: bytes) -> list[tuple[str, dict[int, object], bytes]]:
    """Each picture's camera model, GPS directory and pixels, as Pillow reads them."""
    img = Image.open(io.BytesIO(data))
    assert isinstance(img, MpoImageFile)
    found = []
    for n in range(img.n_frames):
        img.seek(n)
        exif = img.getexif()  # reloaded in place by the next seek: copy what is needed
        found.append(
            (exif[ExifTags.Base.Model], dict(exif.get_ifd(ExifTags.IFD.GPSInfo)), img.tobytes())
        )
    return found


def test_gps_is_stripped_from_every_picture_of_an_mpo_losslessly() -> None:
    original = stereo_mpo()
    before = frames(original)
    assert [(model, bool(gps)) for model, gps, _ in before] == [
        ("left eye", True),
        ("right eye", True),
    ]
    out = io.BytesIO()
    assert strip_jpeg_gps(io.BytesIO(original), out) is True
    stripped = out.getvalue()
    after = frames(stripped)
    assert [(model, gps) for model, gps, _ in after] == [("left eye", {}), ("right eye", {})]
    assert [pixels for *_, pixels in after] == [pixels for *_, pixels in before]
    # Each compressed picture is copied byte for byte, and the index says where it now is.
    img = Image.open(io.BytesIO(stripped))
    assert isinstance(img, MpoImageFile) and img.mpinfo is not None
    entries = img.mpinfo[0xB002]
    second_at = entries[1]["DataOffset"] + stripped.find(b"MPF\0") + 4
    assert stripped[second_at : second_at + 3] == b"\xff\xd8\xff"
    sizes = [entry["Size"] for entry in entries]
    assert sizes == [second_at, len(stripped) - second_at]
    first_scan = original[original.find(b"\xff\xda") : original.rfind(b"\xff\xd8\xff")]
    second_scan = original[original.rfind(b"\xff\xda") :]
    assert stripped[:second_at].endswith(first_scan) and stripped.endswith(second_scan)


def test_an_mpo_without_gps_is_left_as_it_is() -> None:
    plain = corpus.mpo_jpeg()
    out = io.BytesIO()
    assert strip_jpeg_gps(io.BytesIO(plain), out) is False
    assert out.getvalue() == plain


def padded_profile(n: int, size: int) -> bytes:
    """The test wide-gamut profile, padded to ``size`` bytes that differ with ``n``."""
    icc = corpus.wide_gamut_icc()
    padding = n.to_bytes(4, "big") * ((size - len(icc)) // 4)
    body = icc[4:] + padding
    return struct.pack(">I", 4 + len(body)) + body


def tagged_png(icc: bytes) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (60, 180, 80)).save(out, "PNG", icc_profile=icc)
    return out.getvalue()


@pytest.mark.nats
@pytest.mark.s3
async def test_an_mpo_whose_gps_cannot_be_removed_is_refused_not_stored(ctx: Context) -> None:
    """With original_gps = "strip", an MPO whose second picture is missing (its index points
    past the end) passes the checks, which decode the first picture only; it is refused
    rather than stored with the location."""
    whole = stereo_mpo()
    second = whole.rindex(b"\xff\xd8\xff")  # where the second picture starts
    truncated = whole[:second]
    ingest = ctx.settings.ingest.model_copy(update={"original_gps": "strip"})
    stripping = dataclasses.replace(
        ctx, settings=ctx.settings.model_copy(update={"ingest": ingest})
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield truncated

    with pytest.raises(UploadRejectedError) as caught:
        await accept_upload(stripping, chunks(), "stereo.mpo", "test")
    assert caught.value.status == 422 and "location cannot be removed" in caught.value.reason
    assert await ctx.store.list_keys("uploads/") == []


def test_icc_caches_keep_digests_not_profiles_and_stay_bounded() -> None:
    profile_bytes = 512 * 1024
    count = 70  # more than either cache holds
    pngs = [tagged_png(padded_profile(n, profile_bytes)) for n in range(count)]
    derive(tagged_png(padded_profile(count, profile_bytes)), OPTIONS)  # warm up
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for png in pngs:
            assert derive(png, OPTIONS).info["color_profile"] == "darkroom test wide gamut"
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Deriving 70 images, each with its own 512 KB profile, keeps less than one profile.
    assert kept - start < profile_bytes, f"{(kept - start) / 2**20:.1f} MB kept"
    for cache in (imaging._PROFILE_NAMES, imaging._TRANSFORMS):
        keys = cache.keys()
        assert 0 < len(keys) <= cache.size < count
        for key in keys:
            digest, *modes = key
            assert isinstance(digest, bytes) and len(digest) == 32
            assert all(isinstance(mode, str) for mode in modes)


def test_private_files_are_owner_only_whatever_was_there_before(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    leftover = tmp_path / "run.json.tmp"
    for path in (target, leftover):
        path.write_text("old")
        path.chmod(0o644)
    write_private(target, "secret")
    assert target.read_text() == "secret" and not leftover.exists()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
