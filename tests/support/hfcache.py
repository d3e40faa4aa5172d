"""A Hugging Face cache of a test's own, with the hub out of reach."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub access, an empty Hugging Face cache under ``tmp_path``, no DARKROOM_* from
    outside, and no ./darkroom.toml; the cache's path."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for name in list(os.environ):
        if name.startswith("DARKROOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return cache
