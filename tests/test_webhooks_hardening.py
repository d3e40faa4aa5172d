"""Outgoing webhooks under failure: a dead endpoint, a database outage, an endpoint deleted
mid-flight, a replay that fails partway, a worker that starts first. On the real servers,
with the receiver and helpers of tests/test_webhooks.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats.errors
import orjson
import pytest

import bus.gateway.webhooks_api as webhooks_api
import bus.intake.webhooks as webhooks
from bus.core import subjects
from bus.core.settings import Settings
from bus.infra.nats_auth import Role
from bus.ops.embedded import NatsServer
from bus.runtime.context import Context, open_context
from bus.runtime.registry import load
from bus.runtime.runner import FunctionRunner
from bus.state.webhooks import Attempt, HookNames, Recorder, Webhooks, delivery, enqueue
from tests.test_nats_auth import as_role, server
from tests.test_webhooks import (
    Receiver,
    Start,
    add_endpoint,
    api,
    attempts,
    eventually,
    publish,
    queue_empty,
    receiver,
    settings,
    start_webhooks,
)

pytestmark = [pytest.mark.nats, pytest.mark.s3]
# The fixtures shared with test_webhooks (and test_nats_auth's server with roles).
__all__ = ["api", "receiver", "server", "settings", "start_webhooks"]

HOUR = 3600.0


def store_of(ctx: Context) -> Webhooks:
    assert ctx.db is not None
    return Webhooks(ctx.db.pool)


async def states(ctx: Context, endpoint_id: str) -> dict[str, str]:
    assert ctx.db is not None
    rows = await ctx.db.pool.fetch(
        "SELECT webhook_id, state FROM webhook_messages WHERE endpoint_id = $1", endpoint_id
    )
    return {r["webhook_id"]: r["state"] for r in rows}


def attempt(wid: str, endpoint_id: str, error: str | None = None) -> Attempt:
    return Attempt(wid, endpoint_id, "e1", "captioned", "{}", 1, 204, 1.0, error, True)


@pytest.mark.parametrize("settings", [{"schedule_s": (0.0, HOUR), "concurrency": 2}], indirect=True)
async def test_a_dead_endpoints_waiting_retries_do_not_block_the_others(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    """A retry waits as a delayed nak, which JetStream counts as ack-pending: any cap on
    those is a cap on every endpoint's deliveries. Here more retries wait than the
    deliverer takes at once, and another endpoint still gets its event."""
    dead = await add_endpoint(api, receiver, "dead", event_types=["captioned"])
    receiver.answer["dead"] = 500
    await add_endpoint(api, receiver, "live", event_types=["ingested"])
    await start_webhooks()
    for _ in range(4):
        await publish(ctx, "captioned")

    async def all_waiting() -> bool:
        return len(await attempts(api, dead["id"])) == 4

    await eventually(all_waiting)
    hooks = HookNames(ctx.names)
    info = await ctx.js.consumer_info(hooks.stream, hooks.durable)
    assert info.num_ack_pending == 4  # the dead endpoint's retries, an hour out
    assert info.config.max_ack_pending == -1  # no cap they could fill
    event = await publish(ctx, "ingested")
    await receiver.wait(lambda: len(receiver.hits["live"]) == 1)
    assert receiver.hits["live"][0].event["id"] == event.id


@pytest.mark.parametrize("settings", [{"schedule_s": (0.0, 0.2, 0.2)}], indirect=True)
async def test_a_database_outage_uses_up_no_attempt(
    ctx: Context,
    api: Any,
    receiver: Receiver,
    start_webhooks: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deliveries nakked while the database is down are no attempts: once it is back the
    message gets its whole schedule, numbered from 1, then is given up and leaves the
    queue (it used to stay there forever once JetStream's delivery count ran out)."""
    monkeypatch.setattr(webhooks, "DB_RETRY_S", 0.05)
    endpoint = await add_endpoint(api, receiver, "c")
    receiver.answer["c"] = 500
    runner = await start_webhooks()
    store = runner.state.store
    real_get = store.get
    lookups = 0

    async def down_for_a_while(endpoint_id: str) -> Any:
        nonlocal lookups
        lookups += 1
        if lookups <= 12:  # more deliveries than the schedule has attempts, and then some
            raise ConnectionRefusedError("postgres is restarting")
        return await real_get(endpoint_id)

    monkeypatch.setattr(store, "get", down_for_a_while)
    await publish(ctx)

    async def given_up() -> bool:
        return list((await states(ctx, endpoint["id"])).values()) == ["failed"]

    await eventually(given_up, timeout=30)
    await eventually(lambda: queue_empty(ctx), timeout=30)
    assert lookups > 12
    log = await attempts(api, endpoint["id"])
    assert sorted(x["attempt"] for x in log) == [1, 2, 3]
    assert all(x["status_code"] == 500 for x in log)
    hooks = HookNames(ctx.names)
    info = await ctx.js.consumer_info(hooks.stream, hooks.durable)
    assert info.config.max_deliver == -1 and info.num_ack_pending == 0


async def test_an_attempt_at_a_deleted_endpoint_fails_no_other(
    ctx: Context, api: Any, receiver: Receiver
) -> None:
    endpoint = await add_endpoint(api, receiver, "b")
    store = store_of(ctx)
    good = attempt("msg_" + "1" * 32, endpoint["id"])
    gone = attempt("msg_" + "2" * 32, "wh_" + "0" * 16)
    assert await store.record_many([good, gone]) == {endpoint["id"]: None}
    assert (await store.message(endpoint["id"], good.webhook_id))["state"] == "delivered"
    assert await store.progress(gone.webhook_id) is None


async def test_one_bad_row_fails_only_itself_in_a_batch(
    ctx: Context, api: Any, receiver: Receiver
) -> None:
    """An error text Postgres cannot store (a NUL) fails its own attempt, not the batch."""
    endpoint = await add_endpoint(api, receiver, "n")
    recorder = Recorder(store_of(ctx))
    good = attempt("msg_" + "3" * 32, endpoint["id"])
    bad = attempt("msg_" + "4" * 32, endpoint["id"], error="answered \x00")
    results = await asyncio.gather(
        recorder.record(good), recorder.record(bad), return_exceptions=True
    )
    assert results[0] is None  # written: the endpoint is not failing
    assert isinstance(results[1], asyncpg.PostgresError)
    assert await store_of(ctx).progress(good.webhook_id) == ("delivered", 1)


@pytest.mark.parametrize("settings", [{"schedule_s": (0.0,)}], indirect=True)
async def test_a_replay_that_fails_partway_strands_nothing(
    ctx: Context,
    api: Any,
    receiver: Receiver,
    start_webhooks: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = await add_endpoint(api, receiver, "e")
    receiver.answer["e"] = 500
    since = datetime.now(UTC) - timedelta(seconds=5)
    runner = await start_webhooks()
    for _ in range(3):
        await publish(ctx)

    async def all_failed() -> bool:
        found = await states(ctx, endpoint["id"])
        return len(found) == 3 and set(found.values()) == {"failed"}

    await eventually(all_failed)
    await runner.drain(timeout=5)  # no deliverer: only the replay's own effect is seen
    real_enqueue = webhooks_api.enqueue
    calls = 0

    async def nats_fails_after_one(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise nats.errors.TimeoutError
        await real_enqueue(*args, **kwargs)

    monkeypatch.setattr(webhooks_api, "enqueue", nats_fails_after_one)
    replay = f"/api/webhooks/{endpoint['id']}/replay"
    resp = await api.post(replay, params={"since": since.isoformat()})
    assert resp.status == 503 and resp.content_type == "application/problem+json"
    after = await states(ctx, endpoint["id"])
    assert sorted(after.values()) == ["failed", "failed", "pending"]  # one queued, two not

    monkeypatch.setattr(webhooks_api, "enqueue", real_enqueue)
    resp = await api.post(replay, params={"since": since.isoformat()})
    assert resp.status == 202, await resp.text()
    again = (await resp.json())["webhook_ids"]
    assert sorted(again) == sorted(w for w, s in after.items() if s == "failed")
    assert set((await states(ctx, endpoint["id"])).values()) == {"pending"}
    info = await ctx.js.stream_info(HookNames(ctx.names).stream)
    assert info.state.messages == 3  # each queued once


@pytest.mark.parametrize("settings", [{"schedule_s": (0.0, HOUR)}], indirect=True)
async def test_a_message_still_retried_is_not_replayed(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    endpoint = await add_endpoint(api, receiver, "p")
    receiver.answer["p"] = 500
    await start_webhooks()
    await publish(ctx)

    async def retrying() -> bool:
        return list((await states(ctx, endpoint["id"])).values()) == ["pending"]

    await eventually(retrying)
    (wid,) = await states(ctx, endpoint["id"])
    resp = await api.post(f"/api/webhooks/{endpoint['id']}/deliveries/{wid}/replay")
    assert resp.status == 409 and resp.content_type == "application/problem+json"
    assert "still being retried" in (await resp.json())["detail"]
    info = await ctx.js.stream_info(HookNames(ctx.names).stream)
    assert info.state.messages == 1  # the retrying copy alone


async def test_a_copy_of_a_delivered_message_is_not_sent_again(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    endpoint = await add_endpoint(api, receiver, "d")
    await start_webhooks()
    event = await publish(ctx)
    await receiver.wait(lambda: len(receiver.hits["d"]) == 1)

    async def delivered() -> bool:
        return list((await states(ctx, endpoint["id"])).values()) == ["delivered"]

    await eventually(delivered)
    (wid,) = await states(ctx, endpoint["id"])
    row = await store_of(ctx).message(endpoint["id"], wid)
    assert row is not None
    # A second copy, as a replay racing the first copy's delivery would have queued it.
    item = delivery(endpoint["id"], wid, event.id, "captioned", row["body"].encode())
    item["attempts_before"] = 1
    await enqueue(ctx.js, HookNames(ctx.names), item, msg_id=f"{wid}-copy")
    await eventually(lambda: queue_empty(ctx))  # acked
    assert len(receiver.hits["d"]) == 1
    assert len(await attempts(api, endpoint["id"])) == 1


async def test_a_worker_starts_webhooks_before_any_endpoint_exists(
    settings: Settings,
    server: NatsServer,
) -> None:
    """Only the gateway role may create streams: the gateway declares the webhook queue
    with the others, and the worker's deliverer only looks it up."""
    fn = load("webhooks")
    gateway = as_role(settings, server, Role.GATEWAY)
    worker_settings = as_role(settings, server, Role.WORKER)
    async with (
        open_context(gateway, [], "gateway", database=True),
        open_context(worker_settings, [fn.spec], "worker", role=Role.WORKER) as worker,
    ):
        runner = FunctionRunner(fn, worker)
        await runner.start()
        try:
            hooks = HookNames(worker.names)
            info = await worker.js.consumer_info(hooks.stream, hooks.durable)
            assert info.config.durable_name == hooks.durable
        finally:
            await runner.drain(5)


@pytest.mark.parametrize(
    "kind",
    ["caption", "captioned.*", "failed", "failed.caption.x", "Captioned", "webhook_disabled.*"],
)
async def test_an_event_type_that_can_never_match_is_refused(
    api: Any, receiver: Receiver, kind: str
) -> None:
    resp = await api.post("/api/webhooks", json={"url": receiver.url("t"), "event_types": [kind]})
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    assert repr(kind) in (await resp.json())["detail"]


async def test_every_kind_of_event_type_that_can_match_is_taken(
    api: Any, receiver: Receiver
) -> None:
    kinds = ["captioned", "failed.*", "failed.caption", "cancelled.generate", "webhook_disabled"]
    created = await add_endpoint(api, receiver, "t", event_types=kinds)
    assert created["event_types"] == sorted(kinds)


async def test_the_disabled_event_is_not_lost_when_its_publish_fails(
    ctx: Context,
    api: Any,
    receiver: Receiver,
    start_webhooks: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint is off at once; the event that says so goes out once NATS takes it."""
    gone = await add_endpoint(api, receiver, "gone")
    receiver.answer["gone"] = 410
    disabled = ctx.names.subject(subjects.WEBHOOK_DISABLED)
    real_publish = ctx.js.publish
    refused = 0

    async def nats_fails_once(subject: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal refused
        if subject == disabled and not refused:
            refused += 1
            raise nats.errors.TimeoutError
        return await real_publish(subject, *args, **kwargs)

    monkeypatch.setattr(ctx.js, "publish", nats_fails_once)
    monkeypatch.setattr(webhooks, "ANNOUNCE_INTERVAL_S", 0.1)
    sub = await ctx.js.subscribe(disabled, ordered_consumer=True)
    await start_webhooks()
    await publish(ctx)
    said = orjson.loads((await sub.next_msg(timeout=30)).data)
    assert refused == 1  # the first try failed: this is the later announcement
    assert said["data"]["endpoint_id"] == gone["id"] and "410" in said["data"]["reason"]
    doc = await (await api.get(f"/api/webhooks/{gone['id']}")).json()
    assert doc["active"] is False
    assert len(receiver.tries["gone"]) == 1
    await sub.unsubscribe()


async def test_an_endpoint_turned_off_by_a_deliverer_that_died_is_announced_by_the_next(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    """As if a deliverer was killed between turning the endpoint off and saying so."""
    gone = await add_endpoint(api, receiver, "gone")
    store = store_of(ctx)
    assert await store.disable(gone["id"], "the endpoint answered 410 Gone") is not None
    sub = await ctx.js.subscribe(
        ctx.names.subject(subjects.WEBHOOK_DISABLED), ordered_consumer=True
    )
    await start_webhooks()  # it looks for unannounced ones as it starts
    said = orjson.loads((await sub.next_msg(timeout=30)).data)
    assert said["data"]["endpoint_id"] == gone["id"]
    await eventually(lambda: nothing_unannounced(store))
    await sub.unsubscribe()


async def nothing_unannounced(store: Webhooks) -> bool:
    return await store.unannounced() == []


async def logged_final(ctx: Context, endpoint_id: str, count: int) -> bool:
    return list((await states(ctx, endpoint_id)).values()) == ["failed"] * count
