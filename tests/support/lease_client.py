"""A separate process that uses the VRAM ledger, for tests that need real crashes and races.

``python -m tests.support.lease_client '<json>'`` with ``url``, ``worker``, ``capacity_mb``,
``reserve_mb``, ``ttl_s`` and either

- ``"hold": mb`` plus ``bucket`` and ``host``: take one lease, print ``granted <id>``, then
  sleep until killed; or
- nothing more: print ``ready``, then serve one plan per stdin line,
  ``{"bucket", "host", "ops": [[mb, hold_ms], ...]}``: acquire, read the ledger right away,
  hold, release, in order; print one JSON line per grant (``mb``, ``used_mb``, ``usable_mb``,
  ``present``), then ``done``. Serving many plans saves a process start per plan.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS

from bus.gpu.leases import Device, Holder, Ledger


def ledger(kv: Any, spec: dict[str, Any], host: str) -> Ledger:
    device = Device("cpu", spec["capacity_mb"], spec["reserve_mb"])
    return Ledger(kv, device, Holder.here(host, spec["worker"]), ttl_s=spec["ttl_s"])


async def hold(nc: NATS, spec: dict[str, Any]) -> None:
    kv = await nc.jetstream(timeout=5).key_value(spec["bucket"])
    async with ledger(kv, spec, spec["host"]) as leases:
        lease = await leases.acquire("held-model", spec["hold"], timeout=10)
        print(f"granted {lease.id}", flush=True)
        await asyncio.Event().wait()


async def serve(nc: NATS, spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        plan = orjson.loads(line)
        kv = await nc.jetstream(timeout=5).key_value(plan["bucket"])
        async with ledger(kv, spec, plan["host"]) as leases:
            for mb, hold_ms in plan["ops"]:
                lease = await leases.acquire(f"model-{mb}", mb, timeout=15)
                seen = await leases.snapshot()
                record = {
                    "mb": mb,
                    "used_mb": seen.used_mb,
                    "usable_mb": seen.usable_mb,
                    "present": seen.lease(lease.id) is not None,
                }
                print(orjson.dumps(record).decode(), flush=True)
                await asyncio.sleep(hold_ms / 1000)
                await leases.release(lease)
        print("done", flush=True)


async def main(spec: dict[str, Any]) -> None:
    nc = await nats.connect(spec["url"], **spec.get("connect", {}))
    try:
        await (hold(nc, spec) if "hold" in spec else serve(nc, spec))
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(orjson.loads(sys.argv[1])))
