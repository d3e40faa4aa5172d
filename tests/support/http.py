"""Small helpers for talking to the gateway in tests."""

from __future__ import annotations

import aiohttp


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def form(*files: tuple[str, bytes]) -> aiohttp.FormData:
    """A multipart body with one ``file`` part per (name, bytes)."""
    data = aiohttp.FormData()
    for name, body in files:
        data.add_field("file", body, filename=name, content_type="application/octet-stream")
    return data
