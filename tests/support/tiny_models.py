"""Tiny offline models for tests: the product's own demo builder (bus/models/demo.py), so
tests load exactly what `profile demo` serves, through the real ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from bus.core.settings import ModelTask
from bus.models.catalogue import demo_dir
from bus.models.demo import ensure_demo


def tiny_model(data_dir: Path, task: ModelTask) -> Path:
    """Build (once) and return the demo model of ``task`` under ``data_dir``."""
    return ensure_demo(task, demo_dir(data_dir, task))
