"""webhooks: every lifecycle event, as a signed CloudEvent, to every endpoint that wants it.

Two halves in one function:

- **fan-out** (the handler): for each active endpoint whose event-type filter matches, queue
  one delivery on the work-queue stream (:class:`bus.state.webhooks.HookNames`). Its
  ``Nats-Msg-Id`` is the message's webhook-id (derived from the endpoint and the event), so
  an event handled twice is queued once;
- **delivery** (:class:`Deliverer`, started by the function's setup): POSTs each queued
  message as CloudEvents 1.0 structured JSON, signed per Standard Webhooks with the
  endpoint's secret (and, after a rotation, its older ones still in their grace period).
  An attempt that fails is nakked with the next delay of ``webhooks.schedule_s`` (with
  jitter). The attempt number is counted from the log (the message's latest logged
  attempt), not from JetStream's delivery count: a delivery nakked because the database was
  down is no attempt and uses up none of the schedule. So retries survive restarts and
  nothing is held in memory. A ``410 Gone`` disables the endpoint at once; an endpoint
  that failed every attempt for ``webhooks.disable_after_days`` is disabled too. Either way a
  ``webhook_disabled`` event says so. Every attempt is logged in the read model.

It lives in the intake layer, beside :mod:`bus.intake.fetch`, because it connects to
addresses that outsiders chose: a destination is vetted by the same rules as a fetched
image's URL (no private, loopback or link-local address unless ``webhooks.allow_networks``
holds it), on every new connection, and the connection goes to the vetted address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import nats.errors
import nats.js.errors
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from nats.aio.msg import Msg
from standardwebhooks import Webhook
from yarl import URL

from bus import Call, Context, Emit, Event, Function, Retry, Spec, subjects
from bus.core.envelope import now_iso
from bus.core.settings import WebhookSettings
from bus.infra.postgres import CONNECTION_ERRORS
from bus.infra.tasks import cancel_and_wait, say_still_running
from bus.intake.fetch import FetchError, IPNetwork, address_refusal, resolve_vetted
from bus.runtime.pull import PullConsumer
from bus.state.webhooks import (
    EVENT_TOPICS,
    STAGED_TOPICS,
    Attempt,
    Endpoint,
    HookNames,
    Recorder,
    Webhooks,
    declare_consumer,
    delivery,
    enqueue,
    matches,
    webhook_id,
)

log = logging.getLogger("darkroom.webhooks")

CONTENT_TYPE = "application/cloudevents+json"
TYPE_PREFIX = "io.darkroom."
USER_AGENT = "darkroom-webhooks"
MAX_ERROR_CHARS = 500
READ_LIMIT = 64 * 1024  # of a receiver's answer: read (so the connection is reused), not kept
DB_RETRY_S = 5.0  # the read model is unreachable: try the message again after this
# A change to an endpoint (turned off, a new URL or secret) reaches the deliveries within this.
ENDPOINT_TTL_S = 1.0
MAX_CACHED = 10_000
PRUNE_INTERVAL_S = 3600.0
ANNOUNCE_INTERVAL_S = 10.0  # how often turned-off endpoints not yet announced are looked for
STOP_WAIT_S = 10.0  # how long a stop waits for a cancelled attempt to end

SPEC = Spec(
    name="webhooks",
    listens=(*EVENT_TOPICS, *(f"{topic}.>" for topic in STAGED_TOPICS)),
    concurrency=32,
    ack_wait=10.0,
    max_deliver=10,
    backoff=(0.5, 2.0, 10.0),
    needs_db=True,
    cancellable=False,  # it reports cancels like every other event
)


# --- the CloudEvent -----------------------------------------------------------------------
def cloud_event(event: Event) -> bytes:
    """``event`` as CloudEvents 1.0 structured JSON: its own attributes, the darkroom type
    under ``io.darkroom.``, and what it is about plus its details as ``data``."""
    data: dict[str, Any] = {}
    if event.image_id is not None:
        data["image_id"] = event.image_id
    if event.job_id is not None:
        data["job_id"] = event.job_id
    if event.object is not None:
        data["object"] = event.object.to_dict()
    if event.causation_id is not None:
        data["causation_id"] = event.causation_id
    data["details"] = event.data
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": TYPE_PREFIX + event.type,
        "time": event.time,
        "datacontenttype": "application/json",
        "data": data,
    }
    subject = event.subject or event.image_id or event.job_id
    if subject:
        doc["subject"] = subject
    return orjson.dumps(doc)


# --- fan-out ------------------------------------------------------------------------------
async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if event.type == f"{subjects.FAILED}.{SPEC.name}":
        return []  # our own failure would fail the same way, and loop
    deliverer: Deliverer = call.state
    try:
        endpoints = await deliverer.store.all(active_only=True)
    except CONNECTION_ERRORS as exc:
        raise Retry(f"the database is unavailable: {type(exc).__name__}: {exc}") from None
    wanted = [e for e in endpoints if matches(e.event_types, event.type)]
    if event.type == subjects.WEBHOOK_DISABLED:  # it is off; a read from before may list it
        wanted = [e for e in wanted if e.id != event.data.get("endpoint_id")]
    if not wanted:
        return []
    body = cloud_event(event)
    await asyncio.gather(
        *(
            enqueue(
                ctx.js,
                deliverer.hooks,
                delivery(e.id, wid, event.id, event.type, body),
                msg_id=wid,
            )
            for e in wanted
            for wid in (webhook_id(e.id, event.id),)
        )
    )
    return []


# --- delivery -----------------------------------------------------------------------------
class VettingResolver(AbstractResolver):
    """Resolves a host for a new connection and refuses it unless every address passes the
    ingest fetcher's vetting; the connection then goes to those very addresses."""

    def __init__(self, allow_networks: tuple[IPNetwork, ...]) -> None:
        self._networks = allow_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            results = await resolve_vetted(host, port, self._networks)
        except FetchError as exc:
            raise OSError(exc.detail) from None
        found = [r for r in results if family in (socket.AF_UNSPEC, r["family"])]
        if not found:
            raise OSError(f"{host} has no vetted address of family {family!r}")
        return found

    async def close(self) -> None:
        return None


def literal_refusal(url: str, allow_networks: tuple[IPNetwork, ...]) -> str | None:
    """Why ``url`` may not be posted to when its host is an IP address (aiohttp connects to
    those without asking the resolver); None when it may, or when its host is a name."""
    host = URL(url).raw_host or ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    reason = address_refusal(address, allow_networks)
    return None if reason is None else f"{reason} is not an allowed destination"


def retry_delay(settings: WebhookSettings, attempt: int) -> float | None:
    """The wait after failed attempt ``attempt`` (1-based, of this run of the schedule: a
    replay starts it again), with jitter; None: give up."""
    if attempt >= len(settings.schedule_s):
        return None
    delay = float(settings.schedule_s[attempt])
    return delay * (1 + random.uniform(-settings.jitter, settings.jitter))


class Signer:
    """Standard Webhooks signatures; one :class:`Webhook` per secret, made once."""

    def __init__(self) -> None:
        self._hooks: dict[str, Webhook] = {}

    def headers(self, wid: str, body: str, secrets_: list[str]) -> dict[str, str]:
        moment = datetime.now(UTC)
        signatures = []
        for secret in secrets_:
            hook = self._hooks.get(secret)
            if hook is None:
                hook = self._hooks[secret] = Webhook(secret)
            signatures.append(hook.sign(wid, moment, body))
        return {
            "webhook-id": wid,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": " ".join(signatures),
            "Content-Type": CONTENT_TYPE,
            "User-Agent": USER_AGENT,
        }


class Deliverer:
    """Takes deliveries from the work queue and POSTs them (see the module docstring)."""

    def __init__(self, ctx: Context, hooks: HookNames, store: Webhooks) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.store = store
        self.settings = ctx.settings.webhooks
        self._networks = tuple(self.settings.allow_networks)
        self._signer = Signer()
        self._recorder = Recorder(store)
        self._endpoints: dict[str, tuple[float, Endpoint | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._chores: list[asyncio.Task[None]] = []  # pruning the log, late announcements
        self._consumer = PullConsumer(
            ctx.nc,
            hooks.stream,
            hooks.durable,
            capacity=self.settings.concurrency,
            on_message=self._accept,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=VettingResolver(self._networks),
            use_dns_cache=False,
            limit=self.settings.concurrency,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            trust_env=False,  # no proxy from the environment: the vetted address is the peer
        )
        await self._consumer.start()
        self._chores = [
            asyncio.create_task(self._prune_forever(), name="webhooks-prune"),
            asyncio.create_task(self._announce_forever(), name="webhooks-announce"),
        ]

    async def _prune_forever(self) -> None:
        """Keep the delivery log to ``webhooks.log_keep_days`` (every process does it: a
        delete of what another deleted first deletes nothing)."""
        while True:
            before = datetime.now(UTC) - timedelta(days=self.settings.log_keep_days)
            try:
                pruned = await self.store.prune(before)
                if pruned:
                    log.info("forgot %d webhook messages settled before %s", pruned, before)
            except Exception as exc:  # the database is back by the next round, or says why
                log.warning("could not prune the webhook log: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(PRUNE_INTERVAL_S)

    async def _announce_forever(self) -> None:
        """Announce the endpoints turned off whose event could not be published then (or
        whose deliverer died first): at start, then every ANNOUNCE_INTERVAL_S."""
        while True:
            try:
                for endpoint_id, reason, turned_off in await self.store.unannounced():
                    await self._announce(endpoint_id, reason, turned_off)
            except Exception as exc:  # a loop that died would announce nothing again
                log.warning(
                    "could not announce disabled endpoints now: %s: %s", type(exc).__name__, exc
                )
            await asyncio.sleep(ANNOUNCE_INTERVAL_S)

    async def stop(self) -> None:
        """Stop taking deliveries; let the attempts under way finish (each is bounded by the
        timeout). Anything cut short comes back after the consumer's ack_wait."""
        await self._consumer.stop()
        await cancel_and_wait(*self._chores)
        self._chores = []
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.timeout_s + 1)
        # An attempt cancelled here is not recorded: its message comes back after ack_wait.
        stuck = await cancel_and_wait(*self._tasks, timeout=STOP_WAIT_S, recancel=False)
        say_still_running(stuck, STOP_WAIT_S, then="; stopping without this delivery attempt")
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _endpoint(self, endpoint_id: str) -> Endpoint | None:
        """The endpoint as stored at most ENDPOINT_TTL_S ago (a read per delivery would
        cost as much as the delivery)."""
        now = time.monotonic()
        cached = self._endpoints.get(endpoint_id)
        if cached is not None and now - cached[0] < ENDPOINT_TTL_S:
            return cached[1]
        endpoint = await self.store.get(endpoint_id)
        if len(self._endpoints) > MAX_CACHED:
            self._endpoints.clear()
        self._endpoints[endpoint_id] = (now, endpoint)
        return endpoint

    def _accept(self, msg: Msg) -> None:
        task = asyncio.create_task(self._deliver(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, msg: Msg) -> None:
        try:
            await self._attempt(msg)
        except Exception:
            log.exception("webhook delivery failed unexpectedly; trying it again later")
            with contextlib.suppress(Exception):
                await msg.nak(delay=DB_RETRY_S)
        finally:
            self._consumer.release()

    async def _attempt(self, msg: Msg) -> None:
        try:
            item = orjson.loads(msg.data)
            wid, endpoint_id, body = item["webhook_id"], item["endpoint_id"], item["body"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.error("dropping an unreadable webhook delivery: %r", msg.data[:200])
            await msg.term()
            return
        before = int(item.get("attempts_before", 0))
        try:
            endpoint = await self._endpoint(endpoint_id)
            # A first delivery of the fan-out's message has no attempt logged yet; any other
            # (a retry, a replay, one that waited out a database outage) asks the log.
            redelivered = (msg.metadata.num_delivered or 1) > 1 or "attempts_before" in item
            progress = await self.store.progress(wid) if redelivered else None
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable (%s); webhook %s waits", exc, wid)
            await msg.nak(delay=DB_RETRY_S)
            return
        if endpoint is None:
            await msg.ack()  # deleted: its messages went with it
            return
        state, logged = progress or ("pending", before)
        if state == "delivered":
            await msg.ack()  # another copy delivered it (a redelivery after a lost ack)
            return
        attempt = logged + 1
        run = attempt - before  # this attempt's place in the schedule

        def outcome(
            status: int | None, latency: float | None, error: str | None, final: bool
        ) -> Attempt:
            return Attempt(
                webhook_id=wid,
                endpoint_id=endpoint_id,
                event_id=str(item.get("event_id", "")),
                event_type=str(item.get("event_type", "")),
                body=body,
                attempt=attempt,
                status_code=status,
                latency_ms=latency,
                # (a text column holds no NUL, which a receiver's answer may put in an error)
                error=error if error is None else error[:MAX_ERROR_CHARS].replace("\x00", "?"),
                final=final,
            )

        if not endpoint.active:
            reason = endpoint.disabled_reason or "turned off"
            await self._recorder.record(
                outcome(None, None, f"not sent: endpoint is off ({reason})", True)
            )
            await msg.ack()
            return
        status, latency, error = await self._post(endpoint, wid, body)
        # The POST may have taken most of ack_wait: the log write gets a fresh one, so the
        # message is not handed to another attempt meanwhile.
        await msg.in_progress()
        if error is None:
            await self._recorder.record(outcome(status, latency, None, True))
            await msg.ack()
            return
        delay = None if status == 410 else retry_delay(self.settings, run)
        failing_since = await self._recorder.record(outcome(status, latency, error, delay is None))
        if status == 410:
            await self._disable(endpoint, "the endpoint answered 410 Gone")
        elif failing_since is not None and datetime.now(UTC) - failing_since >= timedelta(
            days=self.settings.disable_after_days
        ):
            await self._disable(
                endpoint,
                f"every attempt failed since {failing_since.isoformat(timespec='seconds')} "
                f"(webhooks.disable_after_days = {self.settings.disable_after_days:g})",
            )
        if delay is None:
            log.warning(
                "webhook %s to %s given up after attempt %d: %s", wid, endpoint.id, attempt, error
            )
            await msg.ack()
        else:
            await msg.nak(delay=delay)

    async def _post(
        self, endpoint: Endpoint, wid: str, body: str
    ) -> tuple[int | None, float | None, str | None]:
        """One attempt: the answer's status, the latency in ms, and what went wrong (None:
        a 2xx)."""
        refusal = literal_refusal(endpoint.url, self._networks)
        if refusal is not None:
            return None, None, refusal
        headers = self._signer.headers(wid, body, endpoint.signing_secrets(datetime.now(UTC)))
        assert self._session is not None
        started = time.monotonic()
        try:
            async with self._session.post(
                endpoint.url, data=body.encode(), headers=headers, allow_redirects=False
            ) as response:
                await response.content.read(READ_LIMIT)
                status = response.status
        except TimeoutError:
            took = (time.monotonic() - started) * 1000
            return None, took, f"no answer within {self.settings.timeout_s:g} s (timeout_s)"
        except (aiohttp.ClientError, OSError) as exc:
            took = (time.monotonic() - started) * 1000
            return None, took, f"{type(exc).__name__}: {exc}"
        took = (time.monotonic() - started) * 1000
        if 200 <= status < 300:
            return status, took, None
        return status, took, f"answered {status}"

    async def _disable(self, endpoint: Endpoint, reason: str) -> None:
        """Turn the endpoint off, then say so with an event.

        The change commits first, so whoever hears the event finds the endpoint off. It is
        marked unannounced until the event is out: one that cannot be published now is
        announced later, by this or another deliverer (:meth:`_announce_forever`)."""
        self._endpoints.pop(endpoint.id, None)
        turned_off = await self.store.disable(endpoint.id, reason)
        if turned_off is None:
            return  # deleted or turned off meanwhile (by whoever said so)
        log.warning("webhook endpoint %s (%s) disabled: %s", endpoint.id, endpoint.url, reason)
        await self._announce(endpoint.id, reason, turned_off)

    async def _announce(self, endpoint_id: str, reason: str, turned_off: datetime) -> None:
        """Publish ``webhook_disabled``; its id names the moment the endpoint was turned
        off, so announcing it again (two deliverers, a retry) says it once."""
        stamp = int(turned_off.timestamp() * 1000)
        event = Event(
            id=f"webhook-disabled-{endpoint_id}-{stamp}",
            type=subjects.WEBHOOK_DISABLED,
            source="darkroom/webhooks",
            time=now_iso(),
            subject=endpoint_id,
            # Not the URL: this event reaches every key (a URL may carry a token).
            data={"endpoint_id": endpoint_id, "reason": reason},
        )
        try:
            await self.ctx.js.publish(
                self.ctx.names.subject(subjects.WEBHOOK_DISABLED),
                event.encode(),
                headers={"Nats-Msg-Id": event.id},
            )
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("webhook endpoint %s's disabling is announced later: %s", endpoint_id, exc)
            return
        try:
            await self.store.announced(endpoint_id, turned_off)
        except Exception as exc:  # said again later, under the same id
            log.warning("could not note that %s's disabling was announced: %s", endpoint_id, exc)


async def setup(ctx: Context) -> Deliverer:
    if ctx.db is None:
        raise RuntimeError("webhooks runs with the read model (its Spec needs_db)")
    try:
        hooks = await declare_consumer(ctx.js, ctx.settings)
    except nats.js.errors.NotFoundError:
        stream = HookNames(ctx.names).stream
        raise RuntimeError(
            f"no webhook queue {stream} on this NATS yet; start `darkroom up` or `darkroom "
            "gateway` first (they declare the streams)"
        ) from None
    except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
        stream = HookNames(ctx.names).stream
        raise RuntimeError(
            f"cannot declare the webhook queue's consumer on {stream} ({type(exc).__name__}: "
            f"{exc}); this process's NATS role must be allowed its consumer"
        ) from None
    deliverer = Deliverer(ctx, hooks, Webhooks(ctx.db.pool))
    await deliverer.start()
    return deliverer


async def teardown(ctx: Context, deliverer: Deliverer) -> None:
    await deliverer.stop()


FUNCTION = Function(SPEC, handle=handle, setup=setup, teardown=teardown)
