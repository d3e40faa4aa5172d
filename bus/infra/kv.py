"""Compare-and-set on one NATS KV key: the read-decide-write loop every writer shares.

A writer reads the key, decides what it should hold (``change``), and writes it only if
nobody wrote in between (``kv.create`` when absent, ``kv.update(last=revision)`` after).
When someone did, it sleeps a random, growing moment ("full jitter") and decides again on
the newer value: writers that collided do not collide again in lockstep, which an
immediate retry (or a bare ``sleep(0)``) makes likely when several processes contend.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

MAX_ATTEMPTS = 64
BACKOFF_BASE_S = 0.002
BACKOFF_CAP_S = 0.1


class CasConflictError(Exception):
    """Every attempt lost the race to another writer."""


@dataclass(frozen=True, slots=True)
class Versioned:
    """A key's value after :func:`compare_and_set`: what it wrote, or what it found."""

    value: bytes | None  # None: the key is absent (or deleted); b"": it holds nothing
    revision: int  # 0 when absent
    written: bool


def backoff_s(conflicts: int) -> float:
    """How long to wait after ``conflicts`` lost races in a row (full jitter)."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (conflicts - 1)))


async def compare_and_set(
    kv: KeyValue,
    key: str,
    change: Callable[[bytes | None], bytes | None],
    *,
    attempts: int = MAX_ATTEMPTS,
) -> Versioned:
    """Set ``key`` to ``change(current)`` unless that is None (no write wanted).

    ``change`` may be called several times, once per attempt, always with the newest value;
    it must not have side effects; an exception it raises ends the call.

    Raises:
        CasConflictError: ``attempts`` races lost in a row.
        nats.errors.Error: the bucket cannot be reached.
    """
    for conflicts in range(1, attempts + 1):
        try:
            entry = await kv.get(key)
            current, revision = entry.value or b"", entry.revision or 0
        except KeyNotFoundError:  # absent, or deleted (nats-py reports a marker as missing)
            current, revision = None, 0
        wanted = change(current)
        if wanted is None:
            return Versioned(current, revision, written=False)
        try:
            if revision:
                written = await kv.update(key, wanted, last=revision)
            else:
                written = await kv.create(key, wanted)
            return Versioned(wanted, written, written=True)
        except KeyWrongLastSequenceError:
            if conflicts < attempts:
                await asyncio.sleep(backoff_s(conflicts))
    raise CasConflictError(f"KV key {key!r}: lost the write race {attempts} times in a row")
