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
:attr:`Options.buffer` events. An event notify projects goes out once notify has written it
to the read model (:mod:`bus.gateway.projection`), so a page that fetches a document on
hearing an event finds the event in it.

**Resume.** A client that reconnects with ``Last-Event-ID: N`` (or, when it opens a new
stream, ``?last_event_id=N``) gets every event after N exactly once: the ones the hub still
holds are queued for it in the same step that attaches it to the live feed (nothing runs in
between, so the seam neither drops nor repeats one); older ones are read from the stream for
that client alone, with a short-lived ordered consumer from N+1 to the end, before it
attaches. An id past the stream's end (a stream made anew) starts at the live feed.

**Who sees what.** An admin key gets every event. Any other key sees pending and rejected
images nowhere (:mod:`bus.gateway.access`), so its stream leaves out the events about an
image that is pending or rejected when the event is written to it (skipped, not renumbered:
the ids of what it gets still rise, and a resume works the same). A decision tells such a
key what it needs: ``approved`` goes to every key (the image appears; the UI fetches it),
``rejected`` only when the image was shown before (it disappears: a key that could see it
learns why, as the image's document would tell it), ``deleted`` to admin keys only (it
follows a rejection). Events that are about no image (a job's ``requested``, its failures,
its step progress) go to every key; but while the policy holds (or may hold) what
generations make, a step report's preview goes to admin keys only (the others get the
report without it).

The hub follows each image's approval in a small cache (:class:`Approval`, the most
recently active :attr:`Options.images` images, never fewer than it buffers events), folding
in the events that decide it as they pass (the upload's and the caption's policy holds, the
decisions) once per event, for all its clients. An image it has not met yet it reads from
the read model first; one the read model has no row of (or that it could not read) counts
as held until it knows better. Live events and those the hub buffers are judged by that
cache; a resume from before the buffer judges the stream's older events by the image's
approval now (the cache, else the read model), so an image approved since shows its earlier
events and one rejected since none. A resume reads the stream only up to the newest event
the hub has judged; the hub hands it the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats.errors
import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, Field

from bus.core import subjects
from bus.core.envelope import EnvelopeError, Event, decode
from bus.core.settings import HoldPolicy
from bus.core.subjects import SAFE_ID_PATTERN
from bus.gateway.access import sees_held
from bus.gateway.live import LIVE
from bus.gateway.problems import Problem
from bus.gateway.projection import NOTIFY, ProjectionGate
from bus.gateway.routes import Reply, Route
from bus.gateway.state import CTX
from bus.infra.postgres import CONNECTION_ERRORS
from bus.infra.tasks import cancel_and_wait
from bus.runtime.context import Context
from bus.state.approvals import DECISIONS, caption_hold, holds_generations, upload_hold
from bus.state.readmodel import SHOWN, nsfw_score

log = logging.getLogger("darkroom.events")

PATH = "/api/events"
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
RETRY_MS = 3000  # how long a browser waits before it reconnects
QUEUE = 1024  # frames a client may have waiting; one more and it is dropped
BUFFER = 4096  # newest events the hub keeps, for resumes that need not read the stream
IMAGES = 16384  # images whose approval the hub follows; the longest quiet one goes first
LINGER_S = 0.02  # frames gather this long before the writers wake (see Options.linger_s)
PROJECTION_WAIT_S = 2.0  # see Options.projection_wait_s
LOOKUP_TIMEOUT_S = 5.0  # the longest the hub waits for the read model about an image
DROP_GRACE_S = 10.0  # a closing stream's last frame has this long to leave, then it is cut
CATCH_UP_WAIT_S = 10.0  # the longest wait for the next stored event while catching up
CATCH_UP_BATCH = 256  # stored events written to a catching-up client at once
LAST_EVENT_ID = "Last-Event-ID"
UPLOADS = frozenset({subjects.UPLOADED, subjects.GENERATED})  # the events that start an image


@dataclass(frozen=True)
class Options:
    """How the event streams behave (tests shorten the heartbeat and the queue)."""

    heartbeat_s: float = HEARTBEAT_S
    retry_ms: int = RETRY_MS
    queue: int = QUEUE
    buffer: int = BUFFER
    images: int = IMAGES
    # How long frames gather before the clients' writers wake: each then writes all that
    # waits in one send. Per event, 1,000 clients cost 1,000 sends and task wake-ups; the
    # linger bounds that by time instead (bench_notify), for this much added latency.
    linger_s: float = LINGER_S
    # The longest an event notify listens to waits for notify's projection of it before it
    # goes out anyway (see bus.gateway.projection); 0: never wait.
    projection_wait_s: float = PROJECTION_WAIT_S


OPTIONS = web.AppKey("event_options", Options)


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as written on the wire, rendered once for every client."""

    seq: int | None  # the stream sequence (its id); None: progress, ephemeral
    image_id: str | None
    job_id: str | None
    text: bytes
    public: bool | None  # whether a key that is not admin gets it; None: while its image is shown
    plain: bytes | None = None  # what a key that is not admin gets instead (no preview)


def read_event(payload: bytes) -> Event | None:
    """The darkroom event of a stored message, or None when it is none (raw S3
    notifications share the stream) or its type cannot be an SSE event name."""
    try:
        event = decode(payload)
    except EnvelopeError:
        return None
    if "\n" in event.type or "\r" in event.type:
        return None
    return event


def event_frame(event: Event, seq: int) -> Frame:
    """The frame of a stored event (see the module for who gets it)."""
    data = orjson.dumps(_public(event)).decode()
    text = f"id: {seq}\nevent: {event.type}\ndata: {data}\n\n".encode()
    return Frame(seq, event.image_id, event.job_id, text, _audience(event))


def _audience(event: Event) -> bool | None:
    """Whether a key that is not admin gets ``event`` whatever its image's approval (True),
    never (False), or while the image is shown (None)."""
    if not event.image_id or event.type == subjects.APPROVED:
        return True
    if event.type == subjects.REJECTED:
        return event.data.get("previous") in SHOWN  # it disappears for the keys it showed to
    if event.type == subjects.DELETED:
        return False
    return None


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


def progress_frame(report: dict[str, Any], previews: bool = True) -> Frame | None:
    """The frame of a step report (as :class:`bus.runtime.call.Progress` sends it). A job's
    goes to every key; one about an image alone, while the image is shown. ``previews``:
    whether a key that is not admin gets the report's preview too (else it gets the rest)."""
    step, total = report.get("step"), report.get("total")
    if not isinstance(step, int) or not isinstance(total, int):
        return None
    doc: dict[str, Any] = {"step": step, "total": total}
    for name in ("stage", "job_id", "image_id", "message", "time"):
        value = report.get(name)
        doc[name] = value if isinstance(value, str) else None
    public = None if doc["job_id"] is None and doc["image_id"] is not None else True
    plain = b"event: progress\ndata: " + orjson.dumps(doc) + b"\n\n"
    kind, data = report.get("preview_type"), report.get("preview_b64")
    if not isinstance(kind, str) or not isinstance(data, str):
        return Frame(None, doc["image_id"], doc["job_id"], plain, public)
    doc["preview"] = f"data:{kind};base64,{data}"
    text = b"event: progress\ndata: " + orjson.dumps(doc) + b"\n\n"
    return Frame(None, doc["image_id"], doc["job_id"], text, public, None if previews else plain)


def control_frame(event: str, doc: dict[str, Any]) -> bytes:
    """A frame of the stream itself (``ready``, ``error``): never an id."""
    return f"event: {event}\ndata: ".encode() + orjson.dumps(doc) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Approval:
    """An image's approval as the hub follows it: the parts the read model derives it from
    (:mod:`bus.state.approvals`, migration 0004), each event folded in by the same rules."""

    decision: str | None = None  # approved or rejected: it outranks the policy
    upload_held: bool = False  # a rule of the policy holds how it came in
    screen: bool = False  # the policy waits for its NSFW score
    caption_held: bool | None = None  # its caption's NSFW score holds it; None: no caption
    caption_rank: int = -1  # the caption's request_seq: a lower one's does not replace it

    @property
    def approval(self) -> str:
        if self.decision is not None:
            return self.decision
        waiting = self.screen and self.caption_held is None
        return "pending" if self.upload_held or self.caption_held or waiting else "none"

    @property
    def shown(self) -> bool:
        """Whether every key sees the image."""
        return self.approval in SHOWN

    def after(self, event: Event, policy: HoldPolicy) -> Approval:
        """The approval once ``event`` (the newest of its image) is folded in."""
        if event.type in UPLOADS:
            hold = upload_hold(policy, event)
            held = hold["upload_hold"] is not None
            return dataclasses.replace(self, upload_held=held, screen=hold["screen"])
        if event.type == subjects.CAPTIONED:
            rank = event.data.get("request_seq")
            rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else -1
            if rank < self.caption_rank:
                return self  # the read model keeps the caption of the newer request too
            held = caption_hold(policy, nsfw_score(event.data.get("nsfw"))) is not None
            return dataclasses.replace(self, caption_held=held, caption_rank=rank)
        if event.type in DECISIONS:
            return dataclasses.replace(self, decision=DECISIONS[event.type])
        return self


# The parts of an image's approval, as the read model holds them.
_APPROVAL_SQL = (
    "SELECT id, decision, upload_hold IS NOT NULL AS upload_held, screen, "
    "CASE WHEN captioned_at IS NOT NULL THEN caption_hold IS NOT NULL END AS caption_held, "
    "coalesce(caption_request_seq, -1) AS caption_rank "
    "FROM images WHERE id = ANY($1::text[])"
)


class Client:
    """One open stream: its filter, whether its key sees held images, and the frames
    waiting to be written to it."""

    def __init__(self, image: str | None, job: str | None, limit: int, sees_held: bool) -> None:
        self.image = image
        self.job = job
        self.limit = limit
        self.sees_held = sees_held  # an admin key: pending and rejected images too
        self.after = 0  # the newest stream sequence handed to it (or behind its resume point)
        self.dropped: str | None = None  # why the hub let go of it
        self._pending: list[bytes] = []
        self._ready = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    def wants(self, frame: Frame, public: bool) -> bool:
        """Whether ``frame`` goes to this client; ``public``: a key that is not admin may
        have it now."""
        return (
            (public or self.sees_held)
            and (self.image is None or frame.image_id == self.image)
            and (self.job is None or frame.job_id == self.job)
        )

    def offer(self, frame: bytes, wake: bool = True) -> bool:
        """Queue ``frame``; False when the queue is full. ``wake=False``: the hub wakes the
        writer later (:meth:`wake`), with whatever else arrived meanwhile, unless the queue
        is half full already (a burst must not fill it while the writer sleeps)."""
        if len(self._pending) >= self.limit:
            return False
        self._pending.append(frame)
        if wake or 2 * len(self._pending) >= self.limit:
            self._ready.set()
        return True

    def wake(self) -> None:
        """Have the writer send what waits."""
        self._ready.set()

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
                try:
                    await resp.write(b"".join(self.take()))
                except ConnectionError:
                    return  # the client went away: nothing to say, nobody to say it to


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
        self._policy = ctx.settings.approval.hold
        # Image id -> its approval, the most recently active last. Never fewer than the
        # ring holds events: the image of every event in the ring is here (or held).
        self._approvals: OrderedDict[str, Approval] = OrderedDict()
        self._images = max(options.images, options.buffer)
        self._due: set[Client] = set()  # handed frames since the last wake-up
        self._flush: asyncio.TimerHandle | None = None
        self.dropped = 0  # clients dropped for falling behind, since start
        self._closed: str | None = None  # why every stream was ended (the gateway stops)
        self.projection = ProjectionGate(
            ctx.js, ctx.names.stream, ctx.names.durable(NOTIFY), options.projection_wait_s
        )

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        js, names = self._ctx.js, self._ctx.names
        await self.projection.start()
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
        await self.projection.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await self._sub.unsubscribe()
            self._sub = None

    def close_all(self, reason: str) -> None:
        """End every stream, and those that attach from now on, saying ``reason``."""
        self._closed = reason
        for client in list(self._clients):
            self._drop(client, reason)

    async def _on_message(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        # In stream order: the messages after this one wait in the subscription meanwhile.
        await self.projection.wait(seq, msg.subject)
        await self.receive(seq, msg.data)

    async def receive(self, seq: int, payload: bytes) -> None:
        """A stored message, in stream order: its image's approval brought up to date, then
        it is kept and handed to the clients it is for."""
        if seq <= self._high:  # the ordered consumer never repeats one; be sure anyway
            return
        event = read_event(payload)
        if event is not None:
            await self._follow(event)
        # No await from here on: the event joins the ring and the clients in one step.
        self._high = seq
        if event is None:
            return
        frame = event_frame(event, seq)
        if len(self._ring) == self._ring.maxlen:
            oldest = self._ring[0].seq
            assert oldest is not None  # the ring holds stored events only
            self._floor = oldest + 1
        self._ring.append(frame)
        self._fan_out(frame)

    async def _follow(self, event: Event) -> None:
        """Fold ``event`` into its image's approval; the first time the hub meets an image
        (but with a decision, which outranks all else), it reads the read model's first.
        An image it cannot know (no row, and this is not its upload; or no answer) stays
        out of the cache: held, until a later event of it finds out."""
        image_id = event.image_id
        if not image_id:
            return
        if event.type == subjects.DELETED:
            self._approvals.pop(image_id, None)
            return
        state = self._approvals.get(image_id)
        if state is None and event.type not in DECISIONS:
            found = await self._look_up([image_id])
            if found is None:
                return
            state = found.get(image_id)
            if state is None and event.type not in UPLOADS:
                return
        self._approvals[image_id] = (state or Approval()).after(event, self._policy)
        self._approvals.move_to_end(image_id)
        if len(self._approvals) > self._images:
            self._approvals.popitem(last=False)

    async def _look_up(self, image_ids: Collection[str]) -> dict[str, Approval] | None:
        """The read model's approval of each of ``image_ids`` it has a row of; None when it
        did not answer (logged: the events wait for admin keys only)."""
        db = self._ctx.db
        if not image_ids or db is None:
            return {}
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S), db.pool.acquire() as conn:
                rows = await conn.fetch(_APPROVAL_SQL, list(image_ids))
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning(
                "the read model did not say whether %d image(s) are shown (%s: %s): their "
                "events go to admin keys only",
                len(image_ids),
                type(exc).__name__,
                exc,
            )
            return None
        return {
            row["id"]: Approval(
                row["decision"],
                row["upload_held"],
                row["screen"],
                row["caption_held"],
                row["caption_rank"],
            )
            for row in rows
        }

    def _shown(self, frame: Frame) -> bool:
        """Whether a key that is not admin may have ``frame`` now."""
        if frame.public is not None:
            return frame.public
        state = self._approvals.get(frame.image_id or "")
        return state is not None and state.shown

    def on_progress(self, report: dict[str, Any]) -> None:
        """A step report from :class:`bus.gateway.live.Live` (any stage)."""
        frame = progress_frame(report, previews=not holds_generations(self._policy))
        if frame is not None:
            self._fan_out(frame)

    def _fan_out(self, frame: Frame) -> None:
        public = self._shown(frame)  # once for all the clients
        for client in list(self._clients):
            if frame.seq is not None:
                if frame.seq <= client.after:
                    continue  # it had this one from the stream already
                client.after = frame.seq
            if not client.wants(frame, public):
                continue
            text = frame.text if client.sees_held or frame.plain is None else frame.plain
            if client.offer(text, wake=False):
                self._due.add(client)
            else:
                self._drop(client, SLOW.format(n=client.limit))
        if self._due and self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.options.linger_s, self.flush)

    def flush(self) -> None:
        """Wake the writers of the clients that were handed frames in the last linger:
        each writes them in one send, rather than one send and one wake-up per event."""
        if self._flush is not None:
            self._flush.cancel()
        self._flush = None
        due, self._due = self._due, set()
        for client in due:
            client.wake()

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
        A client that comes after :meth:`close_all` is dropped at once, with its reason.
        """
        if self._closed is not None:
            client.drop(self._closed)
            return True
        if after is not None and after < self._high:
            if after + 1 < self._floor:
                return False
            missed = [
                frame.text
                for frame in self._ring
                if frame.seq is not None
                and frame.seq > after
                and client.wants(frame, self._shown(frame))
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
        with an ordered consumer of its own up to the stream's end, or to the newest event
        the hub has read if that comes first (the hub judges the ones after it, as they
        pass); the last sequence read."""
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
        batch: list[Frame] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=CATCH_UP_WAIT_S)
                after = msg.metadata.sequence.stream
                event = read_event(msg.data)
                if event is not None:
                    frame = event_frame(event, after)
                    if client.wants(frame, True):  # its filter; its key's view below
                        batch.append(frame)
                end = not msg.metadata.num_pending or after >= self._high
                if batch and (end or len(batch) >= CATCH_UP_BATCH):
                    texts = await self._for_client(client, batch)
                    if texts:
                        await resp.write(b"".join(texts))
                    batch.clear()
                if end:
                    return after
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _for_client(self, client: Client, frames: list[Frame]) -> list[bytes]:
        """What ``client`` may have of these older events, judged by each image's approval
        now: the hub's, else the read model's (one query for the batch). Read for this
        client alone, but only on a resume from before the buffer."""
        if client.sees_held:
            return [frame.text for frame in frames]
        unknown = {
            frame.image_id
            for frame in frames
            if frame.public is None and frame.image_id and frame.image_id not in self._approvals
        }
        found = await self._look_up(unknown) or {}

        def shown(frame: Frame) -> bool:
            if frame.public is not None or frame.image_id in self._approvals:
                return self._shown(frame)
            state = found.get(frame.image_id or "")
            return state is not None and state.shown

        return [frame.text for frame in frames if shown(frame)]


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
            "generated, failed.<stage>, cancelled.<stage>, approved, rejected, deleted...), "
            "progress, or the stream's own: "
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
            "without an id, and is not replayed. A key without the admin scope gets no events "
            "about pending or rejected images: 'approved' when one appears, 'rejected' when "
            "one it could see disappears. A browser signs in first (POST /api/session: a "
            "cookie) or takes a one-use ticket (POST /api/events/ticket)",
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
    client = Client(query.image, query.job, hub.options.queue, await sees_held(request))
    resp = EventSourceResponse(ping_interval=hub.options.heartbeat_s, sep="\n")
    resp.force_close()  # a stream that ends (dropped, shutdown) leaves nothing to reuse
    del resp.headers["Connection"]
    await resp.prepare(request)
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
            await cancel_and_wait(pump, gone)
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
