"""BlurHash placeholders: a ~28-character string the gallery paints while a thumbnail loads.

The encoder follows the published BlurHash algorithm (a few cosine components of the image
in linear light, quantised and written in base 83). It runs on a thumbnail shrunk to at most
32 pixels, where it takes about a millisecond: a C extension would save nothing that shows.
"""

from __future__ import annotations

import math

from PIL import Image

_BASE83 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~"
_TO_LINEAR = [
    (v / 255) / 12.92 if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4
    for v in range(256)
]


def _base83(value: int, length: int) -> str:
    return "".join(_BASE83[(value // 83 ** (length - i)) % 83] for i in range(1, length + 1))


def _to_srgb(value: float) -> int:
    v = min(1.0, max(0.0, value))
    encoded = v * 12.92 if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055
    return int(encoded * 255 + 0.5)


def _signed_sqrt(value: float) -> float:
    return math.copysign(math.sqrt(abs(value)), value)


def encode(img: Image.Image, x_components: int = 4, y_components: int = 3) -> str:
    """The BlurHash of an RGB image (keep it small: the cost grows with its pixel count)."""
    if not (1 <= x_components <= 9 and 1 <= y_components <= 9):
        raise ValueError("BlurHash takes 1 to 9 components each way")
    rgb = img.convert("RGB")
    width, height = rgb.size
    data = rgb.tobytes()
    cos_x = [[math.cos(math.pi * i * x / width) for x in range(width)] for i in range(x_components)]
    cos_y = [
        [math.cos(math.pi * j * y / height) for y in range(height)] for j in range(y_components)
    ]
    # Separable sums: first along each row for every horizontal frequency...
    rows: list[list[tuple[float, float, float]]] = []
    for y in range(height):
        line = data[y * width * 3 : (y + 1) * width * 3]
        reds = [_TO_LINEAR[v] for v in line[0::3]]
        greens = [_TO_LINEAR[v] for v in line[1::3]]
        blues = [_TO_LINEAR[v] for v in line[2::3]]
        rows.append(
            [
                (
                    sum(c * v for c, v in zip(cx, reds, strict=True)),
                    sum(c * v for c, v in zip(cx, greens, strict=True)),
                    sum(c * v for c, v in zip(cx, blues, strict=True)),
                )
                for cx in cos_x
            ]
        )
    # ...then down the columns for every vertical one.
    factors: list[tuple[float, float, float]] = []
    for j in range(y_components):
        for i in range(x_components):
            scale = (1 if i == j == 0 else 2) / (width * height)
            r = g = b = 0.0
            for y in range(height):
                weight = cos_y[j][y]
                row = rows[y][i]
                r += weight * row[0]
                g += weight * row[1]
                b += weight * row[2]
            factors.append((r * scale, g * scale, b * scale))
    dc, ac = factors[0], factors[1:]
    out = _base83((x_components - 1) + (y_components - 1) * 9, 1)
    if ac:
        actual_max = max(abs(v) for f in ac for v in f)
        quantised_max = int(max(0, min(82, math.floor(actual_max * 166 - 0.5))))
        maximum = (quantised_max + 1) / 166
        out += _base83(quantised_max, 1)
    else:
        maximum = 1.0
        out += _base83(0, 1)
    out += _base83((_to_srgb(dc[0]) << 16) + (_to_srgb(dc[1]) << 8) + _to_srgb(dc[2]), 4)
    for f in ac:
        q = [int(max(0, min(18, math.floor(_signed_sqrt(v / maximum) * 9 + 9.5)))) for v in f]
        out += _base83(q[0] * 19 * 19 + q[1] * 19 + q[2], 2)
    return out
