"""Outgoing webhooks on the real servers: a real receiver verifies every delivery's signature
with the standardwebhooks library and parses it with the CloudEvents SDK.

The retry schedule is shortened (``webhooks.schedule_s``) so outages last seconds, and
loopback is allow-listed so the receiver on 127.0.0.1 may be posted to.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from cloudevents.v1.http import from_http
from standardwebhooks import Webhook

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.core.settings import Settings, WebhookSettings
from bus.gateway.app import build_app
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.webhooks import HookNames, Webhooks
from tests.support.streams import eventually as wait_for

pytestmark = [pytest.mark.nats, pytest.mark.s3]

SCHEDULE = (0.0, 0.3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
WAIT_S = 60.0


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """A short schedule and loopback allowed; a test changes more with an indirect
    parameter (a dict of webhook settings)."""
    given = {
        "schedule_s": SCHEDULE,
        "timeout_s": 3.0,
        "allow_networks": ("127.0.0.0/8", "::1/128"),
        **getattr(request, "param", {}),
    }
    hooks = WebhookSettings.model_validate(given)
    return settings.model_copy(update={"webhooks": hooks})


# --- the receiver -------------------------------------------------------------------------
@dataclass
class Hit:
    webhook_id: str
    event: Any  # the parsed CloudEvent
    signatures: list[str]
    timestamp: str  # the webhook-timestamp header
    status: int  # what the receiver answered


@dataclass
class Receiver:
    """An HTTP server that checks each delivery as a receiver would, then records it."""

    port: int = 0
    secrets: dict[str, list[str]] = field(default_factory=dict)  # path -> all must verify
    answer: dict[str, int] = field(default_factory=dict)  # path -> status (default 204)
    hits: dict[str, list[Hit]] = field(default_factory=lambda: defaultdict(list))  # 2xx ones
    tries: dict[str, list[Hit]] = field(default_factory=lambda: defaultdict(list))  # all
    failures: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = await request.read()
        headers = dict(request.headers)
        status = self.answer.get(path, 204)
        try:
            assert headers["Content-Type"] == "application/cloudevents+json", headers
            for secret in self.secrets[path]:
                Webhook(secret).verify(body, headers)
            event = from_http(headers, body)
        except Exception as exc:
            self.failures.append(f"{path}: {type(exc).__name__}: {exc}")
            return web.Response(status=400)
        signatures = headers["webhook-signature"].split(" ")
        hit = Hit(headers["webhook-id"], event, signatures, headers["webhook-timestamp"], status)
        async with self._changed:
            self.tries[path].append(hit)
            if 200 <= status < 300:
                self.hits[path].append(hit)
            self._changed.notify_all()
        return web.Response(status=status)

    async def wait(self, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(check), timeout)

    def ids(self, path: str) -> dict[str, list[str]]:
        """webhook-id -> the CloudEvent ids it came with (one per time it arrived)."""
        found: dict[str, list[str]] = defaultdict(list)
        for hit in self.hits[path]:
            found[hit.webhook_id].append(hit.event["id"])
        return found


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def api(ctx: Context, aiohttp_client: Any, admin: str) -> Any:
    client = await aiohttp_client(build_app(ctx))
    client.session.headers["Authorization"] = f"Bearer {admin}"
    return client


Start = Callable[[], Awaitable[Any]]


@pytest.fixture
def start_webhooks(run_function: Any) -> Start:
    async def start() -> Any:
        return await run_function(load("webhooks"))

    return start


# --- helpers ------------------------------------------------------------------------------
async def add_endpoint(api: Any, receiver: Receiver, path: str, **extra: Any) -> dict[str, Any]:
    resp = await api.post("/api/webhooks", json={"url": receiver.url(path), **extra})
    assert resp.status == 201, await resp.text()
    created: dict[str, Any] = await resp.json()
    receiver.secrets[path] = [created["secret"]]
    return created


async def publish(ctx: Context, topic: str = "captioned", event_id: str | None = None) -> Event:
    image_id = f"img{new_id()[:20]}"
    event = Event(
        id=event_id or f"test-{new_id()}",
        type=topic,
        source="darkroom/test",
        time=now_iso(),
        subject=image_id,
        image_id=image_id,
        data={"caption": "a lighthouse at dusk"},
    )
    # A Nats-Msg-Id of its own: the same event published twice is seen twice (a redelivery).
    await ctx.js.publish(
        ctx.names.subject(topic), event.encode(), headers={"Nats-Msg-Id": new_id()}
    )
    return event


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT_S) -> None:
    """The suite's :func:`tests.support.streams.eventually`, with this module's patience."""
    await wait_for(check, timeout=timeout)


async def attempts(api: Any, endpoint_id: str, **query: Any) -> list[dict[str, Any]]:
    resp = await api.get(f"/api/webhooks/{endpoint_id}/deliveries", params={"limit": 200, **query})
    assert resp.status == 200, await resp.text()
    items: list[dict[str, Any]] = (await resp.json())["items"]
    return items


async def logged(api: Any, endpoint_id: str, count: int) -> bool:
    return len(await attempts(api, endpoint_id)) >= count


async def queue_empty(ctx: Context) -> bool:
    info = await ctx.js.stream_info(HookNames(ctx.names).stream)
    return info.state.messages == 0


# --- tests --------------------------------------------------------------------------------
async def test_outage_then_recovery_delivers_every_event_once_per_endpoint(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    a = await add_endpoint(api, receiver, "a")
    b = await add_endpoint(api, receiver, "b")
    await receiver.stop()  # down while the events happen
    await start_webhooks()
    events = [await publish(ctx) for _ in range(12)]
    await publish(ctx, event_id=events[0].id)  # the same event again: queued once

    async def all_failed_twice() -> bool:
        for endpoint in (a, b):
            failed = [x for x in await attempts(api, endpoint["id"]) if x["error"]]
            if {x["event_id"] for x in failed if x["attempt"] >= 2} != {e.id for e in events}:
                return False
        return True

    await eventually(all_failed_twice)
    await receiver.start()  # back, on the same port
    await receiver.wait(lambda: all(len(receiver.ids(p)) == len(events) for p in ("a", "b")))
    await eventually(lambda: queue_empty(ctx))

    assert not receiver.failures
    for path, endpoint in (("a", a), ("b", b)):
        ids = receiver.ids(path)
        assert sorted(e for got in ids.values() for e in got) == sorted(e.id for e in events)
        assert all(len(got) == 1 for got in ids.values()), f"{path}: a message arrived twice"
        log = await attempts(api, endpoint["id"])
        for wid in ids:
            tries = sorted((x for x in log if x["webhook_id"] == wid), key=lambda x: x["attempt"])
            assert len(tries) >= 3  # two failures at least, then the delivery, one message id
            assert [x["attempt"] for x in tries] == list(range(1, len(tries) + 1))
            assert all(x["error"] for x in tries[:-1]) and tries[-1]["status_code"] == 204
    hit = receiver.hits["a"][0]
    assert hit.event["type"] == "io.darkroom.captioned"
    assert hit.event["specversion"] == "1.0"
    assert hit.event.data["details"] == {"caption": "a lighthouse at dusk"}
    assert hit.event["subject"] == hit.event.data["image_id"]


async def test_restart_in_the_middle_loses_nothing(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    await add_endpoint(api, receiver, "r")
    receiver.answer["r"] = 503  # failing: deliveries wait in the queue, between attempts
    first = await start_webhooks()
    events = [await publish(ctx) for _ in range(20)]
    endpoint_id = (await (await api.get("/api/webhooks")).json())["items"][0]["id"]

    async def all_tried() -> bool:
        tried = {x["event_id"] for x in await attempts(api, endpoint_id)}
        return tried == {e.id for e in events}

    await eventually(all_tried)
    await first.drain(timeout=10)  # darkroom stops mid-outage...
    del receiver.answer["r"]  # ...the receiver recovers while it is down...
    await start_webhooks()  # ...and a new process takes over from the queue
    await receiver.wait(lambda: len(receiver.ids("r")) == len(events))
    assert not receiver.failures
    assert {e for got in receiver.ids("r").values() for e in got} == {e.id for e in events}


async def test_410_gone_disables_the_endpoint_with_an_event(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    gone = await add_endpoint(api, receiver, "gone")
    receiver.answer["gone"] = 410
    sub = await ctx.js.subscribe(
        ctx.names.subject(subjects.WEBHOOK_DISABLED), ordered_consumer=True
    )
    await start_webhooks()
    await publish(ctx)
    msg = await sub.next_msg(timeout=WAIT_S)
    said = orjson.loads(msg.data)
    assert said["data"]["endpoint_id"] == gone["id"] and "410" in said["data"]["reason"]
    # Off before it is said: whoever hears the event finds it off.
    doc = await (await api.get(f"/api/webhooks/{gone['id']}")).json()
    assert doc["active"] is False and "410" in doc["disabled_reason"]
    log = await wait_for(lambda: attempts(api, gone["id"]), what="the attempt logged")
    assert [x["attempt"] for x in log] == [1], "a 410 is not retried"
    assert log[0]["status_code"] == 410 and log[0]["message_state"] == "failed"

    # Later events are not queued for it: a live endpoint's copy of one shows that the
    # fan-out has handled it, and the disabled one has no attempt at it.
    await add_endpoint(api, receiver, "live")
    later = await publish(ctx)
    await receiver.wait(lambda: len(receiver.hits["live"]) == 1)
    assert receiver.hits["live"][0].event["id"] == later.id
    assert later.id not in {x["event_id"] for x in await attempts(api, gone["id"])}
    assert len(receiver.tries["gone"]) == 1  # the one attempt, answered 410
    await sub.unsubscribe()


@pytest.mark.parametrize("settings", [{"disable_after_days": 2e-5}], indirect=True)
async def test_failing_for_days_disables_the_endpoint_with_an_event(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    """disable_after_days is 1.7 s here: the short schedule fails for longer than that."""
    dead = await add_endpoint(api, receiver, "dead")
    receiver.answer["dead"] = 500
    sub = await ctx.js.subscribe(
        ctx.names.subject(subjects.WEBHOOK_DISABLED), ordered_consumer=True
    )
    await start_webhooks()
    event = await publish(ctx)
    said = orjson.loads((await sub.next_msg(timeout=WAIT_S)).data)
    assert said["data"]["endpoint_id"] == dead["id"]
    assert "every attempt failed since" in said["data"]["reason"]
    doc = await (await api.get(f"/api/webhooks/{dead['id']}")).json()
    assert doc["active"] is False and doc["failing_since"] is not None
    log = await attempts(api, dead["id"])
    assert {x["event_id"] for x in log} == {event.id} and len(log) > 1
    # (a retry already queued finds it off, and logs that it sent nothing)
    assert all(x["status_code"] == 500 or "endpoint is off" in x["error"] for x in log)
    await sub.unsubscribe()

    resp = await api.patch(f"/api/webhooks/{dead['id']}", json={"active": True})
    back = await resp.json()
    assert back["active"] is True and back["disabled_reason"] is None
    assert back["failing_since"] is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("ftp://example.com/hook", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("http://user:pw@127.0.0.1/hook", "credentials"),
    ],
)
async def test_bad_destinations_are_refused(api: Any, url: str, why: str) -> None:
    resp = await api.post("/api/webhooks", json={"url": url})
    assert resp.status == 422, await resp.text()
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert why in problem["detail"], problem
    assert (await (await api.get("/api/webhooks")).json())["items"] == []


@pytest.mark.parametrize("settings", [{"allow_networks": ()}], indirect=True)
async def test_a_name_that_resolves_to_loopback_is_refused_unless_allowed(api: Any) -> None:
    resp = await api.post("/api/webhooks", json={"url": "http://localhost:8080/hook"})
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert "loopback" in problem["detail"] and "webhooks.allow_networks" in problem["detail"]


async def test_crud_and_admin_scope(
    api: Any, receiver: Receiver, make_key: Callable[..., Awaitable[str]]
) -> None:
    created = await add_endpoint(
        api, receiver, "crud", event_types=["ingested", "failed.*"], description="ops"
    )
    assert created["secret"].startswith("whsec_")
    Webhook(created["secret"])  # a valid Standard Webhooks secret
    endpoint_id = created["id"]
    listed = (await (await api.get("/api/webhooks")).json())["items"]
    assert [e["id"] for e in listed] == [endpoint_id]
    assert "secret" not in listed[0]
    got = await (await api.get(f"/api/webhooks/{endpoint_id}")).json()
    assert got["event_types"] == ["failed.*", "ingested"] and "secret" not in got

    resp = await api.patch(
        f"/api/webhooks/{endpoint_id}", json={"description": "changed", "event_types": None}
    )
    changed = await resp.json()
    assert resp.status == 200, changed
    assert changed["description"] == "changed" and changed["event_types"] is None
    assert changed["url"] == created["url"] and "secret" not in changed

    resp = await api.patch(f"/api/webhooks/{endpoint_id}", json={"url": "http://10.0.0.9/"})
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    resp = await api.post(
        "/api/webhooks", json={"url": receiver.url("x"), "secret": "whsec_" + "A" * 40 + "!"}
    )
    assert resp.status in (400, 422) and resp.content_type == "application/problem+json"

    reader = await make_key("read", "upload")
    other = {"Authorization": f"Bearer {reader}"}
    for method, path in (
        ("GET", "/api/webhooks"),
        ("POST", "/api/webhooks"),
        ("GET", f"/api/webhooks/{endpoint_id}"),
        ("PATCH", f"/api/webhooks/{endpoint_id}"),
        ("DELETE", f"/api/webhooks/{endpoint_id}"),
        ("GET", f"/api/webhooks/{endpoint_id}/deliveries"),
        ("POST", f"/api/webhooks/{endpoint_id}/replay?since=2020-01-01T00:00:00Z"),
    ):
        resp = await api.request(method, path, headers=other, json={"url": receiver.url("x")})
        assert resp.status == 403, f"{method} {path}: {resp.status}"

    assert (await api.delete(f"/api/webhooks/{endpoint_id}")).status == 204
    assert (await api.get(f"/api/webhooks/{endpoint_id}")).status == 404
    assert (await api.delete(f"/api/webhooks/{endpoint_id}")).status == 404


async def test_filter_log_and_replay_keep_the_webhook_id(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    only = await add_endpoint(api, receiver, "only", event_types=["ingested"])
    await start_webhooks()
    await publish(ctx, "captioned")  # not wanted: filtered out
    wanted = await publish(ctx, "ingested")
    await receiver.wait(lambda: len(receiver.hits["only"]) == 1)
    (hit,) = receiver.hits["only"]
    assert hit.event["id"] == wanted.id and hit.event["type"] == "io.darkroom.ingested"
    await eventually(lambda: logged(api, only["id"], 1))  # logged once the answer came
    (logged_one,) = await attempts(api, only["id"])
    assert logged_one["webhook_id"] == hit.webhook_id and logged_one["attempt"] == 1
    assert logged_one["status_code"] == 204 and logged_one["latency_ms"] >= 0
    assert logged_one["delivered"] and logged_one["message_state"] == "delivered"

    resp = await api.post(f"/api/webhooks/{only['id']}/deliveries/{hit.webhook_id}/replay")
    assert resp.status == 202, await resp.text()
    await receiver.wait(lambda: len(receiver.hits["only"]) == 2)
    assert receiver.hits["only"][1].webhook_id == hit.webhook_id
    assert receiver.hits["only"][1].event["id"] == wanted.id
    await eventually(lambda: logged(api, only["id"], 2))
    log = await attempts(api, only["id"], delivery_id=hit.webhook_id)
    assert sorted(x["attempt"] for x in log) == [1, 2]
    missing = await api.post(f"/api/webhooks/{only['id']}/deliveries/msg_{'0' * 32}/replay")
    assert missing.status == 404


async def test_replay_all_failed_since(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    flaky = await add_endpoint(api, receiver, "flaky")
    receiver.answer["flaky"] = 500
    since = datetime.now(UTC) - timedelta(seconds=5)
    await start_webhooks()
    events = [await publish(ctx) for _ in range(3)]

    async def given_up() -> bool:
        log = await attempts(api, flaky["id"])
        gone = {x["event_id"] for x in log if x["message_state"] == "failed"}
        return gone == {e.id for e in events}

    await eventually(given_up)
    wids = {x["webhook_id"] for x in await attempts(api, flaky["id"])}
    assert max(x["attempt"] for x in await attempts(api, flaky["id"])) == len(SCHEDULE)
    # Every retry is signed anew when sent (a new webhook-timestamp), under the same id.
    for wid in wids:
        tries = [t for t in receiver.tries["flaky"] if t.webhook_id == wid]
        assert len(tries) == len(SCHEDULE)
        stamps = [int(t.timestamp) for t in tries]
        assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
    del receiver.answer["flaky"]
    resp = await api.post(
        f"/api/webhooks/{flaky['id']}/replay", params={"since": since.isoformat()}
    )
    replayed = await resp.json()
    assert resp.status == 202, replayed
    assert set(replayed["webhook_ids"]) == wids and replayed["more"] is False
    await receiver.wait(lambda: len(receiver.ids("flaky")) == 3)
    assert set(receiver.ids("flaky")) == wids

    # The log is kept webhooks.log_keep_days: older settled messages go, with their attempts.
    await eventually(lambda: queue_empty(ctx))
    assert ctx.db is not None
    store = Webhooks(ctx.db.pool)
    assert await store.prune(datetime.now(UTC) - timedelta(days=1)) == 0
    assert await store.prune(datetime.now(UTC) + timedelta(seconds=1)) == 3
    assert await attempts(api, flaky["id"]) == []


async def test_rotation_signs_with_both_secrets(
    ctx: Context, api: Any, receiver: Receiver, start_webhooks: Start
) -> None:
    rot = await add_endpoint(api, receiver, "rot")
    old = rot["secret"]
    resp = await api.patch(f"/api/webhooks/{rot['id']}", json={"rotate_secret": True})
    rotated = await resp.json()
    assert resp.status == 200, rotated
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old and len(rotated["old_secrets_until"]) == 1
    receiver.secrets["rot"] = [old, new]  # the receiver checks that both verify
    await start_webhooks()
    await publish(ctx)
    await receiver.wait(lambda: len(receiver.hits["rot"]) == 1)
    assert not receiver.failures
    (hit,) = receiver.hits["rot"]
    assert len(hit.signatures) == 2 and all(s.startswith("v1,") for s in hit.signatures)
