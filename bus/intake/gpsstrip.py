"""Removing the location from a JPEG original without touching its pixels.

With ``ingest.original_gps = "strip"`` an uploaded JPEG is stored without its EXIF GPS
directory and without XMP packets that carry GPS fields. Only the metadata segments before
the image data are rewritten; the compressed scan is copied byte for byte, so the picture
is exactly the uploaded one. (Renditions never carry EXIF at all, whatever this setting.)

A multi-picture JPEG (MPO: stereo and dual-camera phones) is several JPEGs one after the
other, each with its own EXIF, found through the picture index (the MPF segment) of the
first. Every picture is cleaned, and the index is rewritten with their new sizes and
offsets so that every picture is still found.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import IO

from PIL import ExifTags, Image

_EXIF_HEADER = b"Exif\0\0"
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\0"
_MPF_HEADER = b"MPF\0"
_SOS, _EOI, _APP1, _APP2 = 0xDA, 0xD9, 0xE1, 0xE2
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_MAX_PAYLOAD = 65533
_MP_ENTRY_TAG = 0xB002
_MP_ENTRY_BYTES = 16
_COPY_CHUNK = 1024 * 1024


class NotAJpegError(ValueError):
    pass


@dataclass
class _Header:
    """One picture's segments from SOI up to its first scan, without GPS."""

    data: bytearray
    source_length: int  # the bytes they took in the source
    removed: bool  # GPS (or EXIF that could not be read) was left out
    mpf: int | None = None  # where the picture index (its TIFF header) starts in ``data``
    mpf_end: int = 0  # where it ends in ``data``
    mpf_in_source: int = 0  # where it starts in the source, from the picture's start


@dataclass
class _Picture:
    entry: int  # its place in the index
    start: int  # in the source
    size: int  # as the index gives it
    header: _Header

    @property
    def lost(self) -> int:
        """Bytes its header lost to cleaning."""
        return self.header.source_length - len(self.header.data)


def strip_jpeg_gps(src: IO[bytes], dst: IO[bytes]) -> bool:
    """Copy the JPEG in ``src`` to ``dst`` minus its GPS data; say whether any was found.

    Blocking (file I/O): call it from a thread.
    """
    src.seek(0)
    first = _clean_header(src)
    if first.mpf is None:
        dst.write(first.data)
        _copy(src, dst, None)
        return first.removed
    index = _Index.read(first)
    pictures = _pictures(src, first, index)
    # The index gives offsets from itself: each picture moves up by what the headers before
    # it lost. Sizes are adjusted by what each lost (some writers get them wrong; readers go
    # by the offsets, and the bytes up to the next picture are copied as they are).
    lost = 0
    for picture in pictures:
        index.write(
            first,
            picture.entry,
            size=max(0, picture.size - picture.lost),
            offset=picture.start - lost - first.mpf if picture.entry else 0,
        )
        lost += picture.lost
    for picture, following in zip(pictures, [*pictures[1:], None], strict=True):
        dst.write(picture.header.data)
        scan = picture.start + picture.header.source_length
        _copy_range(src, dst, scan, None if following is None else following.start - scan)
    return any(p.header.removed for p in pictures)


def _clean_header(src: IO[bytes]) -> _Header:
    """Read one picture's segments from its SOI to its first scan (or its end), leaving
    ``src`` at that marker, and return them without GPS."""
    start = src.tell()
    if src.read(2) != b"\xff\xd8":
        raise NotAJpegError("not a JPEG")
    header = _Header(bytearray(b"\xff\xd8"), 0, removed=False)
    while True:
        at = src.tell()
        marker = src.read(2)
        while len(marker) == 2 and marker[1] == 0xFF:  # fill bytes before a marker
            at += 1
            marker = marker[1:] + src.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise NotAJpegError("the JPEG's segment structure is broken")
        code = marker[1]
        if code in (_SOS, _EOI):
            src.seek(at)
            header.source_length = at - start
            return header
        if code in _STANDALONE:
            header.data += marker
            continue
        (length,) = struct.unpack(">H", src.read(2))
        payload = src.read(length - 2)
        if code == _APP1 and payload.startswith(_EXIF_HEADER):
            try:
                cleaned = _exif_without_gps(payload[len(_EXIF_HEADER) :])
            except Exception:  # unreadable EXIF: it cannot be trusted to hold no location
                header.removed = True
                continue
            if cleaned is not None:
                header.removed = True
                if len(cleaned) > _MAX_PAYLOAD - len(_EXIF_HEADER):
                    continue  # cannot be rewritten in one segment: location wins, EXIF goes
                payload = _EXIF_HEADER + cleaned
        elif code == _APP1 and payload.startswith(_XMP_HEADER) and b"GPS" in payload:
            header.removed = True
            continue  # an XMP packet naming GPS fields is dropped whole
        elif code == _APP2 and payload.startswith(_MPF_HEADER) and header.mpf is None:
            header.mpf = len(header.data) + 4 + len(_MPF_HEADER)
            header.mpf_end = len(header.data) + 4 + len(payload)
            header.mpf_in_source = at + 4 + len(_MPF_HEADER) - start
        header.data += marker + struct.pack(">H", len(payload) + 2) + payload


@dataclass(frozen=True)
class _Index:
    """An MPO's picture index: its byte order and, for each picture, where its size and
    offset are written (relative to the index's TIFF header)."""

    endian: str
    fields: list[tuple[int, int]]

    @classmethod
    def read(cls, first: _Header) -> _Index:
        assert first.mpf is not None
        index = bytes(first.data[first.mpf : first.mpf_end])
        try:
            endian = {b"II": "<", b"MM": ">"}[index[:2]]
            (ifd,) = struct.unpack_from(endian + "I", index, 4)
            (count,) = struct.unpack_from(endian + "H", index, ifd)
            for k in range(count):
                tag, _, length, at = struct.unpack_from(endian + "HHII", index, ifd + 2 + 12 * k)
                if tag == _MP_ENTRY_TAG and length >= _MP_ENTRY_BYTES and at + length <= len(index):
                    entries = range(at, at + length - _MP_ENTRY_BYTES + 1, _MP_ENTRY_BYTES)
                    return cls(endian, [(e + 4, e + 8) for e in entries])
        except (KeyError, struct.error):
            pass
        raise NotAJpegError("the MPO's picture index cannot be read")

    def entry(self, first: _Header, n: int) -> tuple[int, int]:
        """Picture ``n``'s size and offset as the index gives them."""
        assert first.mpf is not None
        size_at, offset_at = self.fields[n]
        (size,) = struct.unpack_from(self.endian + "I", first.data, first.mpf + size_at)
        (offset,) = struct.unpack_from(self.endian + "I", first.data, first.mpf + offset_at)
        return size, offset

    def write(self, first: _Header, n: int, *, size: int, offset: int) -> None:
        assert first.mpf is not None
        size_at, offset_at = self.fields[n]
        struct.pack_into(self.endian + "I", first.data, first.mpf + size_at, size)
        struct.pack_into(self.endian + "I", first.data, first.mpf + offset_at, offset)


def _pictures(src: IO[bytes], first: _Header, index: _Index) -> list[_Picture]:
    """Every picture the index lists, in file order, each header cleaned."""
    src.seek(0, 2)
    total = src.tell()
    pictures = [_Picture(0, 0, index.entry(first, 0)[0], first)]
    for n in range(1, len(index.fields)):
        size, offset = index.entry(first, n)
        start = first.mpf_in_source + offset
        if offset == 0 or start >= total:
            raise NotAJpegError(f"picture {n + 1} of the MPO index lies outside the file")
        src.seek(start)
        pictures.append(_Picture(n, start, size, _clean_header(src)))
    pictures.sort(key=lambda p: p.start)
    for picture, following in itertools.pairwise(pictures):
        if picture.start + picture.header.source_length > following.start:
            raise NotAJpegError("the pictures of the MPO overlap")
    return pictures


def _copy_range(src: IO[bytes], dst: IO[bytes], start: int, length: int | None) -> None:
    src.seek(start)
    _copy(src, dst, length)


def _copy(src: IO[bytes], dst: IO[bytes], length: int | None) -> None:
    """Copy ``length`` bytes (or everything left) from ``src`` to ``dst``."""
    while length is None or length > 0:
        chunk = src.read(_COPY_CHUNK if length is None else min(_COPY_CHUNK, length))
        if not chunk:
            return
        dst.write(chunk)
        if length is not None:
            length -= len(chunk)


def _exif_without_gps(tiff: bytes) -> bytes | None:
    exif = Image.Exif()
    exif.load(tiff)
    if ExifTags.IFD.GPSInfo not in exif:
        return None
    del exif[ExifTags.IFD.GPSInfo]
    return exif.tobytes()
