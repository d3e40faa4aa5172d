"""``GET /api/events``: darkroom's lifecycle events as Server-Sent Events, live and resumable.

Each event stored in the stream ``<NS>`` goes out as ``id:`` its stream sequence, ``event:``
its type and ``data:`` its JSON (caption embedding vectors left out). Generation and stage
progress goes out as ``event: progress`` without an id: it is ephemeral, never stored, so
never replayed. ``?image=`` and ``?job=`` keep one image's or one job's events.

**Fan-out.** One :class:`Hub` per gateway reads the stream with one ordered, ephemeral
JetStream consumer (starting just after the stream's last message: "deliver new", made exact)
and hears progress from the gateway's one progress subscription (:class:`bus.gateway.live.Live`).
It hands each event to every client whose filter it passes, into that client's bounded queue;
a client whose queue is full is dropped at once (a last ``event: error`` saying why, then
the connection closes) instead of slowing the others. The hub keeps the newest
:attr:`Options.buffer` events.

**Resume.** A client that reconnects with ``Last-Event-ID: N`` (or, when it opens a new
stream, ``?last_event_id=N``) gets every event after N exactly once: the ones the hub still
holds are queued for it in the same step that attaches it to the live feed (nothing runs in
between, so the seam neither drops nor repeats one); older ones are read from the stream for
that client alone, with a short-lived ordered consumer from N+1 to the end, before it
attaches. An id past the stream's end (a stream made anew) starts at the live feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, Field

from bus.core.envelope import EnvelopeError, Event, decode
from bus.core.subjects import SAFE_ID_PATTERN
from bus.gateway.live import LIVE
from bus.gateway.problems import Problem
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.runtime.context import Context

PATH = "/api/events"
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
RETRY_MS = 3000  # how long a browser waits before it reconnects
QUEUE = 1024  # frames a client may have waiting; one more and it is dropped
BUFFER = 4096  # newest events the hub keeps, for resumes that need not read the stream
DROP_GRACE_S = 10.0  # a closing stream's last frame has this long to leave, then it is cut
CATCH_UP_WAIT_S = 10.0  # the longest wait for the next stored event while catching up
CATCH_UP_BATCH = 256  # stored events written to a catching-up client at once
LAST_EVENT_ID = "Last-Event-ID"


@dataclass(frozen=True)
class Options:
    """How the event streams behave (tests shorten the heartbeat and the queue)."""

    heartbeat_s: float = HEARTBEAT_S
    retry_ms: int = RETRY_MS
    queue: int = QUEUE
    buffer: int = BUFFER


OPTIONS = web.AppKey("event_options", Options)


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as written on the wire, rendered once for every client."""

    seq: int | None  # the stream sequence (its id); None: progress, ephemeral
    image_id: str | None
    job_id: str | None
    text: bytes


def event_frame(payload: bytes, seq: int) -> Frame | None:
    """The frame of a stored message, or None when it is no darkroom event (raw S3
    notifications share the stream) or its type cannot be an SSE event name."""
    try:
        event = decode(payload)
    except EnvelopeError:
        return None
    if "\n" in event.type or "\r" in event.type:
        return None
    data = orjson.dumps(_public(event)).decode()
    text = f"id: {seq}\nevent: {event.type}\ndata: {data}\n\n".encode()
    return Frame(seq, event.image_id, event.job_id, text)


def _public(event: Event) -> dict[str, Any]:
    """The event as sent: a caption's embedding vectors (hundreds of floats each, of use to
    search only) become their length."""
    embeddings = event.data.get("embeddings")
    if isinstance(embeddings, list):
        slim = [
            {k: v for k, v in e.items() if k != "vector"}
            | ({"dims": len(e["vector"])} if isinstance(e.get("vector"), list) else {})
            if isinstance(e, dict)
            else e
            for e in embeddings
        ]
        event = dataclasses.replace(event, data={**event.data, "embeddings": slim})
    doc: dict[str, Any] = orjson.loads(event.encode())
    return doc


def progress_frame(report: dict[str, Any]) -> Frame | None:
    """The frame of a step report (as :class:`bus.runtime.call.Progress` sends it)."""
    step, total = report.get("step"), report.get("total")
    if not isinstance(step, int) or not isinstance(total, int):
        return None
    doc: dict[str, Any] = {"step": step, "total": total}
    for name in ("stage", "job_id", "image_id", "message", "time"):
        value = report.get(name)
        doc[name] = value if isinstance(value, str) else None
    kind, data = report.get("preview_type"), report.get("preview_b64")
    if isinstance(kind, str) and isinstance(data, str):
        doc["preview"] = f"data:{kind};base64,{data}"
    text = b"event: progress\ndata: " + orjson.dumps(doc) + b"\n\n"
    return Frame(None, doc["image_id"], doc["job_id"], text)


def control_frame(event: str, doc: dict[str, Any]) -> bytes:
    """A frame of the stream itself (``ready``, ``error``): never an id."""
    return f"event: {event}\ndata: ".encode() + orjson.dumps(doc) + b"\n\n"


class Client:
    """One open stream: its filter, and the frames waiting to be written to it."""

    def __init__(self, image: str | None, job: str | None, limit: int) -> None:
        self.image = image
        self.job = job
        self.limit = limit
        self.after = 0  # the newest stream sequence handed to it (or behind its resume point)
        self.dropped: str | None = None  # why the hub let go of it
        self._pending: list[bytes] = []
        self._ready = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    def wants(self, frame: Frame) -> bool:
        return (self.image is None or frame.image_id == self.image) and (
            self.job is None or frame.job_id == self.job
        )

    def offer(self, frame: bytes) -> bool:
        """Queue ``frame``; False when the queue is full."""
        if len(self._pending) >= self.limit:
            return False
        self._pending.append(frame)
        self._ready.set()
        return True

    def drop(self, reason: str) -> None:
        """Stop this client now: its waiting frames go, and a write it is stuck in ends."""
        self.dropped = reason
        self._pending.clear()
        self._ready.set()
        if self._pump is not None:
            self._pump.cancel()

    def take(self) -> list[bytes]:
        """Every frame waiting, in order; the queue is empty after."""
        taken, self._pending = self._pending, []
        return taken

    async def pump(self, resp: web.StreamResponse) -> None:
        """Write the queued frames, all that wait at once, until the client is dropped or
        goes away (a write fails)."""
        self._pump = asyncio.current_task()
        while self.dropped is None:
            await self._ready.wait()
            self._ready.clear()
            if self._pending and self.dropped is None:
                await resp.write(b"".join(self.take()))


class Hub:
    """The gateway's one reading of the event stream, shared by every client (see the
    module)."""

    def __init__(self, ctx: Context, options: Options) -> None:
        self._ctx = ctx
        self.options = options
        self._clients: set[Client] = set()
        self._ring: deque[Frame] = deque(maxlen=options.buffer)
        self._floor = 1  # every event from this sequence on that the hub saw is in the ring
        self._high = 0  # the newest stream sequence the hub has read
        self._sub: Subscription | None = None
        self.dropped = 0  # clients dropped for falling behind, since start

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        js, names = self._ctx.js, self._ctx.names
        info = await js.stream_info(names.stream)
        first = info.state.last_seq + 1  # "deliver new", with the first sequence known
        self._floor, self._high = first, first - 1
        self._sub = await js.subscribe(
            names.all_events,
            stream=names.stream,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first
            ),
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await self._sub.unsubscribe()
            self._sub = None

    def close_all(self, reason: str) -> None:
        for client in list(self._clients):
            self._drop(client, reason)

    async def _on_message(self, msg: Msg) -> None:
        self.receive(msg.metadata.sequence.stream, msg.data)

    def receive(self, seq: int, payload: bytes) -> None:
        """A stored message, in stream order: kept, and handed to the clients it is for."""
        if seq <= self._high:  # the ordered consumer never repeats one; be sure anyway
            return
        self._high = seq
        frame = event_frame(payload, seq)
        if frame is None:
            return
        if len(self._ring) == self._ring.maxlen:
            oldest = self._ring[0].seq
            assert oldest is not None  # the ring holds stored events only
            self._floor = oldest + 1
        self._ring.append(frame)
        self._fan_out(frame)

    def on_progress(self, report: dict[str, Any]) -> None:
        """A step report from :class:`bus.gateway.live.Live` (any stage)."""
        frame = progress_frame(report)
        if frame is not None:
            self._fan_out(frame)

    def _fan_out(self, frame: Frame) -> None:
        for client in list(self._clients):
            if frame.seq is not None:
                if frame.seq <= client.after:
                    continue  # it had this one from the stream already
                client.after = frame.seq
            if client.wants(frame) and not client.offer(frame.text):
                self._drop(client, SLOW.format(n=client.limit))

    def _drop(self, client: Client, reason: str) -> None:
        self._clients.discard(client)
        client.drop(reason)
        if reason != SHUTDOWN:
            self.dropped += 1

    def attach(self, client: Client, after: int | None) -> bool:
        """Join ``client`` to the live feed, with the events after ``after`` it missed
        queued first (None: live from now). False when some of those are no longer held,
        or are too many for its queue: the caller reads them from the stream
        (:meth:`catch_up`) and tries again.

        Synchronous on purpose: no event can arrive between the backlog and the live feed.
        """
        if after is not None and after < self._high:
            if after + 1 < self._floor:
                return False
            missed = [
                frame.text
                for frame in self._ring
                if frame.seq is not None and frame.seq > after and client.wants(frame)
            ]
            if len(missed) > client.limit // 2:  # it would start out near its limit
                return False
            for text in missed:
                client.offer(text)
        client.after = max(after or 0, self._high)
        client.offer(control_frame("ready", {"last_event_id": client.after or None}))
        self._clients.add(client)
        return True

    def detach(self, client: Client) -> None:
        self._clients.discard(client)

    async def resume_point(self, after: int) -> int | None:
        """``after``, or None when it is past the stream's end (an id from a stream since
        made anew, or made up): such a client starts at the live feed."""
        if after <= self._high:
            return after
        info = await self._ctx.js.stream_info(self._ctx.names.stream)
        return after if after <= info.state.last_seq else None

    async def catch_up(self, resp: web.StreamResponse, client: Client, after: int) -> int:
        """Write to ``resp`` the stored events after ``after`` that ``client`` wants, read
        with an ordered consumer of its own up to the stream's end; the last sequence read."""
        js, names = self._ctx.js, self._ctx.names
        state = (await js.stream_info(names.stream)).state
        if state.messages == 0 or state.last_seq <= after:
            return max(after, state.last_seq)
        sub = await js.subscribe(
            names.all_events,
            stream=names.stream,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
            ),
        )
        batch: list[bytes] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=CATCH_UP_WAIT_S)
                after = msg.metadata.sequence.stream
                frame = event_frame(msg.data, after)
                if frame is not None and client.wants(frame):
                    batch.append(frame.text)
                end = not msg.metadata.num_pending
                if batch and (end or len(batch) >= CATCH_UP_BATCH):
                    await resp.write(b"".join(batch))
                    batch.clear()
                if end:
                    return after
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


SLOW = (
    "this client fell {n} events behind, so it was dropped rather than slow the others down: "
    "reconnect (with Last-Event-ID) to resume"
)
SHUTDOWN = "the gateway is shutting down: reconnect (with Last-Event-ID) to resume"
UNREADABLE = "the event stream could not be read: reconnect (with Last-Event-ID) to resume"

HUB = web.AppKey("event_hub", Hub)


class EventsQuery(BaseModel):
    image: str | None = Field(None, pattern=SAFE_ID_PATTERN, description="only this image's")
    job: str | None = Field(None, pattern=SAFE_ID_PATTERN, description="only this job's")
    last_event_id: int | None = Field(
        None,
        ge=0,
        description="resume after this event id, as Last-Event-ID does (for a new "
        "EventSource, which cannot send that header); the header wins",
    )
    ticket: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{20,100}$",
        description="a one-use ticket from POST /api/events/ticket, for an EventSource "
        "without a session cookie (never an API key: URLs end up in logs)",
    )


# An event as schemathesis and other OpenAPI 3.1 tools read a text/event-stream: the schema
# describes each event.
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the stream sequence"},
        "event": {
            "type": "string",
            "description": "the event's type (uploaded, ingested, captioned, requested, "
            "generated, failed.<stage>, cancelled.<stage>...), progress, or the stream's own: "
            "ready (live from here), error (the stream ends, and why)",
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer"},
    },
}


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            PATH,
            stream_events,
            "read",
            "Lifecycle events as Server-Sent Events: every event (or one image's or job's) as "
            "it happens, id = its stream sequence; reconnecting with Last-Event-ID resumes "
            "after it, with nothing lost or repeated. Step progress comes as 'progress', "
            "without an id, and is not replayed. A browser signs in first (POST /api/session: "
            "a cookie) or takes a one-use ticket (POST /api/events/ticket)",
            "events",
            responses={
                200: Reply(
                    "the stream: first a retry hint, then the missed events if resuming, "
                    "'ready', and live events; a comment every 15 s keeps it open",
                    content={"text/event-stream": {"schema": EVENT_SCHEMA}},
                ),
                400: "Last-Event-ID is not an event id",
            },
        ),
    ]


async def stream_events(request: web.Request, query: EventsQuery) -> web.StreamResponse:
    hub = request.app[HUB]
    after = _resume_after(request, query)
    if request.method == "HEAD":
        return web.Response(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if after is not None:
        try:
            after = await hub.resume_point(after)
        except (TimeoutError, nats.errors.Error) as exc:
            raise Problem(
                503, "Service Unavailable", f"the event stream did not answer: {exc}"
            ) from None
    resp = EventSourceResponse(ping_interval=hub.options.heartbeat_s, sep="\n")
    resp.force_close()  # a stream that ends (dropped, shutdown) leaves nothing to reuse
    del resp.headers["Connection"]
    await resp.prepare(request)
    client = Client(query.image, query.job, hub.options.queue)
    async with resp:
        pump: asyncio.Task[None] | None = None
        gone: asyncio.Task[None] | None = None
        try:
            await resp.write(f"retry: {hub.options.retry_ms}\n\n".encode())
            while not hub.attach(client, after):
                assert after is not None
                after = await hub.catch_up(resp, client, after)
            pump = asyncio.create_task(client.pump(resp))
            gone = asyncio.create_task(resp.wait())  # the heartbeat found the client gone
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        except ConnectionError:
            return resp  # the client went away
        except (TimeoutError, nats.errors.Error):
            client.dropped = UNREADABLE
        finally:
            hub.detach(client)
            for task in (pump, gone):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        await _close(request, resp, client.dropped)
    return resp


def _resume_after(request: web.Request, query: EventsQuery) -> int | None:
    given = request.headers.get(LAST_EVENT_ID)
    if given is None:
        return query.last_event_id
    if not given.isascii() or not given.isdigit():
        raise Problem(
            400,
            "Bad Last-Event-ID",
            f"Last-Event-ID must be an event id (digits), got {given[:40]!r}",
        )
    return int(given)


async def _close(request: web.Request, resp: web.StreamResponse, reason: str | None) -> None:
    """End the stream: the reason first when there is one (``event: error``). A client that
    does not take it within :data:`DROP_GRACE_S` is cut off."""
    try:
        async with asyncio.timeout(DROP_GRACE_S):
            if reason is not None:
                await resp.write(control_frame("error", {"detail": reason}))
            await resp.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        pass


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    """The app's :class:`Hub` (``app[HUB]``), reading while the app runs; it hears progress
    from the app's :class:`~bus.gateway.live.Live`, so it starts after it."""
    options = app.get(OPTIONS) or Options()
    hub = Hub(app[CTX], options)
    await hub.start()
    live = app[LIVE]
    live.listen(hub.on_progress)
    app[HUB] = hub
    yield
    live.unlisten(hub.on_progress)
    hub.close_all(SHUTDOWN)
    await hub.stop()


async def shutdown(app: web.Application) -> None:
    """Before the server waits for its handlers: end every stream, each saying why."""
    if HUB in app:
        app[HUB].close_all(SHUTDOWN)
