"""The one compare-and-set helper on a real nats-server: no lost update under contention,
no write when nothing changes, and a clear error when every race is lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js.kv import KeyValue

from bus.infra.kv import CasConflictError, backoff_s, compare_and_set
from bus.runtime.context import Context

pytestmark = [pytest.mark.nats, pytest.mark.s3]


def increment(data: bytes | None) -> bytes:
    return str(int(data or b"0") + 1).encode()


async def test_concurrent_writers_lose_no_update(ctx: Context) -> None:
    kv = ctx.digests  # any bucket of the test's own namespace
    await asyncio.gather(*(compare_and_set(kv, "counter", increment) for _ in range(40)))
    assert (await kv.get("counter")).value == b"40"


async def test_no_write_when_the_change_wants_none(ctx: Context) -> None:
    kv = ctx.digests
    first = await compare_and_set(kv, "k", lambda current: b"mine" if current is None else None)
    second = await compare_and_set(kv, "k", lambda current: b"other" if current is None else None)
    assert first.written and first.value == b"mine"
    assert not second.written and second.value == b"mine"
    assert second.revision == first.revision == (await kv.get("k")).revision


async def test_a_deleted_key_is_created_again(ctx: Context) -> None:
    kv = ctx.digests
    await kv.put("gone", b"old")
    await kv.delete("gone")
    again = await compare_and_set(kv, "gone", lambda current: b"new" if current is None else None)
    assert again.written and (await kv.get("gone")).value == b"new"


class Interfering:
    """A KV handle where another writer always gets in between our read and our write."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.writes = 0

    async def get(self, key: str) -> Any:
        return await self.kv.get(key)

    async def update(self, key: str, value: bytes, last: int) -> int:
        await self.kv.put(key, b"7")  # someone else
        self.writes += 1
        return await self.kv.update(key, value, last=last)


async def test_losing_every_race_says_so(ctx: Context) -> None:
    await ctx.digests.put("hot", b"0")
    kv = Interfering(ctx.digests)
    with pytest.raises(CasConflictError, match="lost the write race 3 times"):
        await compare_and_set(kv, "hot", increment, attempts=3)  # type: ignore[arg-type]
    assert kv.writes == 3


def test_backoff_is_jittered_and_capped() -> None:
    waits = [backoff_s(n) for n in range(1, 30) for _ in range(20)]
    assert all(0 <= w <= 0.1 for w in waits)
    assert len(set(waits)) > 100, "not jittered"


async def test_an_empty_value_is_updated_not_created(ctx: Context) -> None:
    kv = ctx.digests
    await kv.put("empty", b"")
    seen: list[bytes | None] = []

    def change(current: bytes | None) -> bytes:
        seen.append(current)
        return b"filled"

    result = await compare_and_set(kv, "empty", change)
    assert result.written and seen == [b""] and (await kv.get("empty")).value == b"filled"
