"""Receiving an upload body into a local spool file, hashing it on the way, off the loop.

Small bodies stay in memory; bigger ones roll over to a temporary file, so memory stays
flat whatever the size. The spool lets an upload be checked completely (and matched
against earlier uploads by its hash) before a single byte reaches the object store.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

from bus.infra.store import ObjectStore, TooLargeError

IN_MEMORY_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class Spool:
    file: IO[bytes]
    size: int
    sha256: str

    def close(self) -> None:
        self.file.close()


def new_spool_file() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_BYTES, prefix="darkroom-upload-")


async def receive(
    store: ObjectStore, head: bytes, rest: AsyncIterator[bytes], max_bytes: int
) -> Spool:
    """Spool ``head`` then everything ``rest`` yields; raise :class:`TooLargeError`.

    The writes happen on a transfer thread that pulls chunks from the loop one at a time.
    """
    loop = asyncio.get_running_loop()
    fp = new_spool_file()

    def pull() -> bytes:
        return asyncio.run_coroutine_threadsafe(_next_or_empty(rest), loop).result()

    def write_all() -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        chunk = head
        while chunk:
            size += len(chunk)
            if size > max_bytes:
                raise TooLargeError(max_bytes)
            digest.update(chunk)
            fp.write(chunk)
            chunk = pull()
        return size, digest.hexdigest()

    try:
        size, sha256 = await store.run_transfer(write_all)
    except BaseException:
        fp.close()
        raise
    return Spool(fp, size, sha256)


class HashingWriter:
    """Writes to a spool file and hashes what passes, so a download needs no second pass."""

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._digest.update(data)
        self._fp.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


async def _next_or_empty(chunks: AsyncIterator[bytes]) -> bytes:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return b""
