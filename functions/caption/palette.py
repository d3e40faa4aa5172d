"""Colour tags from an image's dominant colours: cheap, model-free, useful for search."""

from __future__ import annotations

import colorsys

from PIL import Image

MAX_TAGS = 3
MIN_SHARE = 0.12


def _name(rgb: tuple[int, int, int]) -> str:
    r, g, b = (c / 255 for c in rgb)
    hue, light, sat = colorsys.rgb_to_hls(r, g, b)
    if light < 0.12:
        return "black"
    if light > 0.92:
        return "white"
    if sat < 0.15:
        return "gray"
    degrees = hue * 360
    for limit, name in (
        (15, "red"),
        (40, "orange"),
        (70, "yellow"),
        (170, "green"),
        (200, "cyan"),
        (260, "blue"),
        (300, "purple"),
        (340, "pink"),
    ):
        if degrees < limit:
            return name
    return "red"


def colour_tags(image: Image.Image) -> list[tuple[str, float]]:
    """Names of the colours covering at least MIN_SHARE of the image with their share,
    most common first."""
    small = image.convert("RGB").resize((48, 48), Image.Resampling.BOX)
    quantised = small.quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    palette = quantised.getpalette() or []
    shares: dict[str, int] = {}
    for count, index in quantised.getcolors() or []:
        assert isinstance(index, int)  # a palette image's colours are palette indexes
        rgb = (palette[index * 3], palette[index * 3 + 1], palette[index * 3 + 2])
        name = _name(rgb)
        shares[name] = shares.get(name, 0) + count
    total = sum(shares.values()) or 1
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    shares_of = [(name, count / total) for name, count in ranked]
    return [(name, share) for name, share in shares_of if share >= MIN_SHARE][:MAX_TAGS]
