"""Starting and stopping darkroom processes in tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

DARKROOM = [sys.executable, "-m", "bus.ops.cli"]


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        async def scan() -> str:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if needle in line:
                        return line
                seen = len(self.lines)
                if (
                    self.proc.returncode is not None
                    and self.reader is not None
                    and self.reader.done()
                ):
                    raise AssertionError(
                        f"process exited ({self.proc.returncode}) before printing {needle!r}:\n"
                        + self.output
                    )
                await asyncio.sleep(0.05)

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no line containing {needle!r} within {timeout} s:\n{self.output}"
            ) from None

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5)
        return code


async def start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        *DARKROOM,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=cwd or Path(__file__).resolve().parents[2],
    )
    p = Proc(proc)

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            p.lines.append(line.decode(errors="replace").rstrip())

    p.reader = asyncio.create_task(read())
    return p


@contextlib.asynccontextmanager
async def running(args: list[str], env: dict[str, str]) -> AsyncIterator[Proc]:
    p = await start(args, env)
    try:
        yield p
    finally:
        if p.proc.returncode is None:
            p.signal(signal.SIGTERM)
            try:
                await p.wait(30)
            except TimeoutError:
                p.signal(signal.SIGKILL)
                await p.wait(10)


def pids_of(pattern: str) -> list[int]:
    """Pids whose command line contains ``pattern`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if pattern in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"
            ):
                found.append(int(entry.name))
    return found
