"""Visibility of the VRAM lease ledger on the real bus: GET /api/status/gpus, `darkroom gpus`
and the Prometheus gauges all show the live leases, their models, sizes and holders."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bus.gateway.app import build_app
from bus.gpu.leases import Device, Holder, Ledger, Snapshot, read_devices
from bus.runtime.context import Context
from tests.conftest import unique
from tests.support import procs
from tests.support.clock import past
from tests.support.http import auth

MOVING = {"expires_in_s", "age_s"}  # they change between two reads

pytestmark = [pytest.mark.nats, pytest.mark.s3]

CAPACITY, RESERVE = 1000, 200
GAUGES = ("darkroom_gpu_capacity_mb", "darkroom_gpu_used_mb", "darkroom_gpu_leases")


@pytest.fixture
async def gateway(ctx: Context, aiohttp_client: Any) -> TestClient[Any, Any]:
    """The gateway alone (no functions running: the ledger does not need them)."""
    client: TestClient[Any, Any] = await aiohttp_client(build_app(ctx))
    return client


async def ledger(ctx: Context, host: str, worker: str, ttl_s: float = 10.0) -> Ledger:
    """A Ledger for one worker of ``host`` on a CPU device, in this test's leases bucket."""
    kv = await ctx.js.key_value(ctx.names.leases_kv)
    return Ledger(kv, Device("cpu", CAPACITY, RESERVE), Holder.here(host, worker), ttl_s=ttl_s)


async def devices_over_http(gateway: TestClient[Any, Any], token: str) -> list[dict[str, Any]]:
    response = await gateway.get("/api/status/gpus", headers=auth(token))
    assert response.status == 200, await response.text()
    doc: dict[str, Any] = await response.json()
    assert set(doc) == {"devices"}
    devices: list[dict[str, Any]] = doc["devices"]
    return devices


async def devices_from_cli(env: dict[str, str]) -> list[dict[str, Any]]:
    run = await procs.start(["gpus", "--json"], env)
    assert await run.wait() == 0, run.output
    devices: list[dict[str, Any]] = orjson.loads(run.output)["devices"]
    return devices


async def gauges(
    gateway: TestClient[Any, Any], token: str
) -> dict[str, dict[tuple[str, str], float]]:
    """The GPU gauges from /metrics: name → {(host, device): value}."""
    text = await (await gateway.get("/metrics", headers=auth(token))).text()
    found: dict[str, dict[tuple[str, str], float]] = {name: {} for name in GAUGES}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                key = (sample.labels["host"], sample.labels["device"])
                found[sample.name][key] = sample.value
    return found


def without_timing(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The devices with ``expires_in_s`` and ``age_s`` left out (they move between reads)."""
    return [
        {
            **d,
            "leases": [{k: v for k, v in x.items() if k not in MOVING} for x in d["leases"]],
            "queue": [{k: v for k, v in x.items() if k not in MOVING} for x in d["queue"]],
        }
        for d in devices
    ]


async def test_leases_show_in_status_cli_and_metrics_until_released(
    ctx: Context,
    gateway: TestClient[Any, Any],
    admin: str,
    subprocess_env: dict[str, str],
) -> None:
    host = unique("h")
    async with (
        await ledger(ctx, host, "caption") as a,
        await ledger(ctx, host, "generate") as b,
    ):
        await check_listed_until_released(gateway, admin, subprocess_env, a, b)


async def check_listed_until_released(
    gateway: TestClient[Any, Any], admin: str, env: dict[str, str], a: Ledger, b: Ledger
) -> None:
    asked = time.time()
    first = await a.acquire("blip-base", 300, timeout=2)
    await b.acquire("sdxl-turbo", 400, timeout=2)
    host = a.holder.host

    [device] = await devices_over_http(gateway, admin)
    since_asked = time.time() - asked
    assert {k: device[k] for k in device if k not in ("leases", "queue")} == {
        "key": f"{host}.cpu",
        "host": host,
        "device": "cpu",
        "mode": "balanced",
        "capacity_mb": CAPACITY,
        "reserve_mb": RESERVE,
        "used_mb": 700,
        "free_mb": 100,
    }
    assert device["queue"] == []
    shown = {x["model"]: x for x in device["leases"]}
    assert set(shown) == {"blip-base", "sdxl-turbo"}
    assert shown["blip-base"]["id"] == first.id and shown["blip-base"]["mb"] == 300
    assert shown["sdxl-turbo"]["mb"] == 400
    assert shown["blip-base"]["holder"] == {
        "host": host,
        "pid": a.holder.pid,
        "worker": "caption",
        "instance": a.holder.instance,
    }
    assert shown["sdxl-turbo"]["holder"]["worker"] == "generate"
    # Granted after `asked` and read before now: the age is at most the time in between.
    # A lease expires a TTL after its grant or its latest renewal, so at most a TTL from
    # now, and no earlier than a TTL after `asked`. (Shown rounded to the millisecond.)
    assert a.ttl_s == b.ttl_s
    ms = 0.001
    for x in device["leases"]:
        assert 0 <= x["age_s"] <= since_asked + ms, x
        assert a.ttl_s - since_asked - ms <= x["expires_in_s"] <= a.ttl_s + ms, x

    cli = await devices_from_cli(env)
    assert without_timing(cli) == without_timing([device])
    table = await procs.start(["gpus"], env)
    assert await table.wait() == 0
    assert "CAPACITY MB" in table.output and host in table.output
    lease_lines = [line for line in table.lines if line.startswith("  lease")]
    assert len(lease_lines) == 2
    assert any(
        "blip-base" in line and "300 MB" in line and f"{host}/{a.holder.pid}/caption" in line
        for line in lease_lines
    )

    metrics = await gauges(gateway, admin)
    label = (host, "cpu")
    assert metrics["darkroom_gpu_capacity_mb"] == {label: CAPACITY}
    assert metrics["darkroom_gpu_used_mb"] == {label: 700}
    assert metrics["darkroom_gpu_leases"] == {label: 2}

    await a.release(first)
    [device] = await devices_over_http(gateway, admin)
    assert [x["model"] for x in device["leases"]] == ["sdxl-turbo"]
    assert (device["used_mb"], device["free_mb"]) == (400, 400)
    [cli_device] = await devices_from_cli(env)
    assert [x["model"] for x in cli_device["leases"]] == ["sdxl-turbo"]
    metrics = await gauges(gateway, admin)
    assert metrics["darkroom_gpu_used_mb"] == {label: 400}
    assert metrics["darkroom_gpu_leases"] == {label: 1}


async def test_a_lapsed_lease_is_not_shown(
    ctx: Context, gateway: TestClient[Any, Any], admin: str
) -> None:
    crashed = await ledger(ctx, unique("h"), "caption", ttl_s=1.0)
    lease = await crashed.acquire("blip-base", 300, timeout=2)
    await crashed.close(release=False)  # stops renewing, like a holder that died
    [device] = await devices_over_http(gateway, admin)
    assert [x["model"] for x in device["leases"]] == ["blip-base"]
    # Its last renewal is in the ledger: the lease lapses `grace` after that expiry, and
    # from then on it must not be shown.
    entry = await crashed.kv.get(crashed.key)
    assert entry.value is not None and entry.revision is not None
    last = Snapshot.decode(entry.value, entry.revision).lease(lease.id)
    assert last is not None
    await past(last.expires + crashed.grace_s)
    [device] = await devices_over_http(gateway, admin)
    assert device["leases"] == [] and device["used_mb"] == 0 and device["free_mb"] == 800
    assert (await gauges(gateway, admin))["darkroom_gpu_leases"] == {(device["host"], "cpu"): 0}


async def test_an_empty_ledger_lists_no_devices(
    ctx: Context,
    gateway: TestClient[Any, Any],
    admin: str,
    make_key: Any,
    subprocess_env: dict[str, str],
) -> None:
    assert await devices_over_http(gateway, admin) == []
    assert await devices_over_http(gateway, await make_key("read")) == []
    uploader = await make_key("upload")
    assert (await gateway.get("/api/status/gpus", headers=auth(uploader))).status == 403
    assert (await gateway.get("/api/status/gpus")).status == 401
    assert await devices_from_cli(subprocess_env) == []
    table = await procs.start(["gpus"], subprocess_env)
    assert await table.wait() == 0
    assert "no worker has registered a device" in table.output
    assert await gauges(gateway, admin) == {name: {} for name in GAUGES}
    assert await read_devices(ctx.js, unique("no_such_bucket")) == []


async def test_gpus_needs_a_deployment(settings: object, subprocess_env: dict[str, str]) -> None:
    # No context fixture: nothing is deployed under this namespace, and the CLI creates nothing.
    run = await procs.start(["gpus"], subprocess_env)
    assert await run.wait() == 2
    assert "no darkroom deployment with namespace" in run.output
