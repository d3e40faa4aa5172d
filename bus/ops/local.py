"""This machine's running ``darkroom up``, as other commands find it: ``run.json`` with its
endpoints, the lock that proves it is alive, and its admin key file.

Light on purpose (no server or client libraries): the upload client reads it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

ADMIN_KEY_FILE = "admin.key"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (atomically).

    The temporary file is always a new one: opening a leftover would keep its mode (and
    its owner), whatever mode ``open`` is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask left
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


RUN_FILE = "run.json"
LOCK_FILE = "run.lock"


class InstanceLock:
    """An exclusive ``flock`` on ``<data-dir>/run.lock`` held while ``darkroom up`` runs.

    The kernel drops it when the process dies, however it dies, so a stale run.json never
    blocks a restart (pids are not reliable: in a container every restart is pid 1).
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_running(data_dir: Path) -> bool:
    probe = InstanceLock(data_dir)
    if not probe.path.exists():
        return False
    if probe.acquire():
        probe.release()
        return False
    return True


def write_run_info(data_dir: Path, info: dict[str, Any]) -> None:
    write_private(data_dir / RUN_FILE, json.dumps({**info, "pid": os.getpid()}, indent=2))


def read_run_info(data_dir: Path) -> dict[str, Any] | None:
    """The running stack's endpoints, or None if no live ``darkroom up`` owns this dir."""
    if not is_running(data_dir):
        return None
    try:
        info: dict[str, Any] = json.loads((data_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info


def remove_run_info(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / RUN_FILE).unlink()
