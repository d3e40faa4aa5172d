"""Whether the disk under the test servers has room for a whole run.

SeaweedFS stops taking writes once less than 1% of its disk is free (``weed mini`` has no
flag for it), and a full run of the suite writes about 1.5 GB (PostgreSQL's data and WAL
most of all). Short of that, stores fail late in the run with bare 500s; saying so at the
start names the cause.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

SUITE_WRITES_BYTES = 2 * 1024**3  # a full run measured 1.5 GB; room to spare
STORE_FLOOR_SHARE = 0.01  # SeaweedFS's read-only threshold, a share of the disk's size


class Usage(NamedTuple):
    total: int
    used: int
    free: int


def low_disk_warning(path: Path, usage: Usage | None = None) -> str | None:
    """A sentence saying the disk is too full for a whole run, or None when it has room."""
    total, _, free = usage or shutil.disk_usage(path)
    floor = int(total * STORE_FLOOR_SHARE)
    if free >= floor + SUITE_WRITES_BYTES:
        return None
    gb = 1e9
    return (
        f"{path} has {free / gb:.1f} GB free; SeaweedFS refuses writes below {floor / gb:.1f} GB "
        f"(1% of the disk) and the suite writes up to {SUITE_WRITES_BYTES / gb:.1f} GB: expect "
        "store errors (500, 'the store is unavailable') late in the run"
    )
