"""Removing the location from a JPEG original without touching its pixels.

With ``ingest.original_gps = "strip"`` an uploaded JPEG is stored without its EXIF GPS
directory and without XMP packets that carry GPS fields. Only the metadata segments before
the image data are rewritten; the compressed scan is copied byte for byte, so the picture
is exactly the uploaded one. (Renditions never carry EXIF at all, whatever this setting.)
"""

from __future__ import annotations

import shutil
import struct
from typing import IO

from PIL import ExifTags, Image

_EXIF_HEADER = b"Exif\0\0"
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\0"
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_MAX_PAYLOAD = 65533


class NotAJpegError(ValueError):
    pass


def strip_jpeg_gps(src: IO[bytes], dst: IO[bytes]) -> bool:
    """Copy the JPEG in ``src`` to ``dst`` minus its GPS data; say whether any was found.

    Blocking (file I/O): call it from a thread.
    """
    src.seek(0)
    if src.read(2) != b"\xff\xd8":
        raise NotAJpegError("not a JPEG")
    dst.write(b"\xff\xd8")
    removed = False
    while True:
        marker = src.read(2)
        while len(marker) == 2 and marker[1] == 0xFF:  # fill bytes before a marker
            marker = marker[1:] + src.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise NotAJpegError("the JPEG's segment structure is broken")
        code = marker[1]
        if code in (_SOS, _EOI):
            dst.write(marker)
            shutil.copyfileobj(src, dst, 1024 * 1024)
            return removed
        if code in _STANDALONE:
            dst.write(marker)
            continue
        (length,) = struct.unpack(">H", src.read(2))
        payload = src.read(length - 2)
        if code == _APP1 and payload.startswith(_EXIF_HEADER):
            try:
                cleaned = _exif_without_gps(payload[len(_EXIF_HEADER) :])
            except Exception:  # unreadable EXIF: it cannot be trusted to hold no location
                removed = True
                continue
            if cleaned is not None:
                removed = True
                if len(cleaned) > _MAX_PAYLOAD - len(_EXIF_HEADER):
                    continue  # cannot be rewritten in one segment: location wins, EXIF goes
                payload = _EXIF_HEADER + cleaned
        elif code == _APP1 and payload.startswith(_XMP_HEADER) and b"GPS" in payload:
            removed = True
            continue  # an XMP packet naming GPS fields is dropped whole
        dst.write(marker + struct.pack(">H", len(payload) + 2) + payload)


def _exif_without_gps(tiff: bytes) -> bytes | None:
    exif = Image.Exif()
    exif.load(tiff)
    if ExifTags.IFD.GPSInfo not in exif:
        return None
    del exif[ExifTags.IFD.GPSInfo]
    return exif.tobytes()
