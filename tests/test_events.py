"""``GET /api/events`` on the real bus: Server-Sent Events that resume without a gap or a
repeat, filters, progress, heartbeats, a slow client dropped without slowing the others,
pending and rejected images kept from keys that may not see them, and the ways a browser
authenticates (a session cookie, a one-use ticket).

Events are published straight into the stream, as the functions would; nothing else
publishes in a test's namespace, so the stream's sequences are exactly the ones published.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.core.settings import ApprovalSettings, HoldPolicy, Settings
from bus.gateway.app import build_app
from bus.gateway.events import HUB, OPTIONS, Client, Hub, Options, shutdown
from bus.gateway.sessions import BROWSERS, COOKIE
from bus.runtime.context import Context
from bus.runtime.registry import load
from tests.support.http import auth
from tests.support.streams import eventually

pytestmark = [pytest.mark.nats, pytest.mark.s3]

Api = TestClient[Any, Any]
MakeApi = Callable[..., Awaitable[Api]]
WAIT_S = 20.0  # a safety net for reads that must succeed; never what a test asserts


@pytest.fixture
def make_api(ctx: Context, aiohttp_client: Any) -> MakeApi:
    """Factory: the gateway in-process, its event streams tuned by ``Options`` fields."""

    async def make(**options: Any) -> Api:
        app = build_app(ctx)
        app[OPTIONS] = Options(**{"heartbeat_s": 60.0, **options})
        client: Api = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def reader(make_key: Callable[..., Awaitable[str]]) -> str:
    return await make_key("read")


def hub(api: Api) -> Hub:
    return api.server.app[HUB]


def event(topic: str, image: str | None = None, job: str | None = None, **data: Any) -> Event:
    return Event(
        id=new_id(),
        type=topic,
        source="test",
        time=now_iso(),
        image_id=image,
        job_id=job,
        data=data,
    )


async def publish(ctx: Context, *events: Event) -> list[int]:
    """Store each event; their stream sequences (their SSE ids)."""
    seqs = []
    for each in events:
        ack = await ctx.js.publish(
            ctx.names.subject(each.type), each.encode(), headers={"Nats-Msg-Id": each.id}
        )
        seqs.append(ack.seq)
    return seqs


class Sse:
    """An open event stream, read frame by frame (a comment line is a frame of its own)."""

    def __init__(self, response: ClientResponse) -> None:
        assert response.status == 200, response.status
        assert response.content_type == "text/event-stream"
        self.response = response

    async def frame(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        async with asyncio.timeout(WAIT_S):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError(f"the stream ended; read so far: {fields}")
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if fields:
                        return fields
                    continue
                if line.startswith(":"):
                    return {"comment": line[1:].strip()}
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    async def until(self, event: str) -> list[dict[str, str]]:
        """Every frame up to and including the first ``event``, comments left out."""
        frames = []
        while True:
            frame = await self.frame()
            if "comment" not in frame:
                frames.append(frame)
            if frame.get("event") == event:
                return frames

    async def stored(self) -> dict[str, str]:
        """The next frame that is not a comment; an ``error`` (the server ending the stream)
        fails the test with its reason."""
        while True:
            frame = await self.frame()
            if frame.get("event") == "error":
                raise AssertionError(f"the server ended the stream: {frame.get('data')}")
            if "comment" not in frame:
                return frame

    async def to_id(self, last: int) -> list[dict[str, str]]:
        """Every frame up to and including the stored event ``last``, comments left out."""
        frames: list[dict[str, str]] = []
        while not frames or int(frames[-1].get("id", -1)) < last:
            frames.append(await self.stored())
        return frames

    async def count_ids(self, count: int) -> list[int]:
        """The ids of the next ``count`` stored events read."""
        ids: list[int] = []
        while len(ids) < count:
            frame = await self.stored()
            if "id" in frame:
                ids.append(int(frame["id"]))
        return ids

    async def ids(self, last: int) -> list[int]:
        """The ids of the stored events read, up to and including ``last``."""
        return [int(f["id"]) for f in await self.to_id(last) if "id" in f]

    def close(self) -> None:
        self.response.close()  # drops the connection, as a lost network would


async def open_stream(api: Api, query: str = "", **headers: str) -> Sse:
    stream = Sse(await api.get(f"/api/events{query}", headers=headers))
    first = await stream.frame()
    assert first == {"retry": "3000"}
    return stream


async def live_stream(api: Api, query: str = "", **headers: str) -> Sse:
    """A stream read up to its ``ready`` frame: from here on it is live."""
    stream = await open_stream(api, query, **headers)
    frames = await stream.until("ready")
    assert [f["event"] for f in frames] == ["ready"]
    return stream


# --- ids and resume -----------------------------------------------------------------------


async def test_resume_after_a_dropped_connection_loses_nothing_and_repeats_nothing(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    api = await make_api()
    stream = await live_stream(api, **auth(reader))
    first = await publish(ctx, *(event(subjects.UPLOADED, image=f"i{n}") for n in range(3)))
    frames = [await stream.frame() for _ in first]
    assert [int(f["id"]) for f in frames] == first
    assert [f["event"] for f in frames] == ["uploaded"] * 3
    assert orjson.loads(frames[0]["data"])["image_id"] == "i0"
    stream.close()
    missed = await publish(ctx, *(event(subjects.INGESTED, image=f"i{n}") for n in range(3)))
    again = await open_stream(api, **auth(reader), **{"Last-Event-ID": str(first[-1])})
    later = await publish(ctx, event(subjects.CAPTIONED, image="i0"))
    frames = await again.to_id(later[-1])
    assert [int(f["id"]) for f in frames if "id" in f] == missed + later
    # 'ready' comes once the missed events the hub held are queued (those still on their
    # way to it follow, as live ones do).
    assert [f["event"] for f in frames].count("ready") == 1


async def test_resume_from_before_the_buffer_reads_the_stream_and_meets_the_live_feed(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    """The hub holds 8 events; the client missed hundreds, some published while it
    resumes: it gets each exactly once, in order, across the seam from the stream to the
    live feed."""
    # A queue longer than all 400 events: however the reader is scheduled on a busy host,
    # it is never dropped for being slow (another test covers that), so only the seam decides.
    api = await make_api(buffer=8, queue=512)
    stream = await live_stream(api, **auth(reader))
    seen = await publish(ctx, event(subjects.UPLOADED, image="a"))
    assert await stream.ids(seen[-1]) == seen
    stream.close()
    missed = await publish(ctx, *(event(subjects.UPLOADED, image=f"m{n}") for n in range(200)))
    more: list[int] = []

    async def keep_publishing() -> None:
        for n in range(200):
            more.extend(await publish(ctx, event(subjects.INGESTED, image=f"m{n}")))

    publisher = asyncio.create_task(keep_publishing())
    again = await open_stream(api, **auth(reader), **{"Last-Event-ID": str(seen[-1])})
    # Read as a client does, while the events come.
    got = await again.count_ids(len(missed) + 200)
    await publisher
    assert got == missed + more


class Recorder:
    """Stands for a client's connection (a pure unit test of the hub): the writes made."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.wrote = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.wrote.set()


async def test_events_arriving_within_the_linger_go_out_in_one_write(ctx: Context) -> None:
    """Per event, a thousand clients would cost a thousand sends and task wake-ups: the hub
    wakes each writer once per linger, and it writes all that waits at once."""
    hub = Hub(ctx, Options(linger_s=3600, queue=64))  # it lingers until flushed
    client = Client(None, None, 64, False)
    assert hub.attach(client, None)
    connection = Recorder()
    pump = asyncio.create_task(client.pump(connection))  # type: ignore[arg-type]
    await connection.wrote.wait()  # the "ready" frame, queued by attach: written at once
    connection.wrote.clear()
    for seq in range(1, 11):  # each receive awaits (the image's approval) in between
        await hub.receive(seq, event(subjects.UPLOADED, image=f"l{seq}").encode())
    hub.flush()  # what the linger's timer does
    await connection.wrote.wait()
    pump.cancel()
    assert len(connection.writes) == 2, [w[:20] for w in connection.writes]
    frames = connection.writes[1].decode().split("\n\n")
    assert [f.split("\n")[0] for f in frames if f] == [f"id: {n}" for n in range(1, 11)]


async def test_the_seam_between_missed_and_live_events_drops_and_repeats_nothing(
    ctx: Context,
) -> None:
    """The hub's rules, without a server: it holds the newest events (4 here); a client
    resuming within them gets them queued before anything live; one resuming before them
    must read the stream first; one ahead of the hub (it saw newer events through another
    gateway) gets nothing twice."""
    hub = Hub(ctx, Options(buffer=4, queue=16))
    stored = {seq: event(subjects.UPLOADED, image=f"h{seq}").encode() for seq in range(1, 10)}
    for seq in range(1, 7):
        await hub.receive(seq, stored[seq])
    await hub.receive(6, stored[6])  # a repeat is ignored
    assert not hub.attach(Client(None, None, 16, False), 1)  # 2 is no longer held
    near, ahead, fresh = (Client(None, None, 16, False) for _ in range(3))
    assert hub.attach(near, 4) and hub.attach(ahead, 8) and hub.attach(fresh, None)
    for seq in range(7, 10):
        await hub.receive(seq, stored[seq])

    def ids(client: Client) -> list[int | str]:
        frames = [f.decode() for f in client.take()]
        return [int(f.split("\n")[0][4:]) if f.startswith("id: ") else "ready" for f in frames]

    assert ids(near) == [5, 6, "ready", 7, 8, 9]
    assert ids(ahead) == ["ready", 9]
    assert ids(fresh) == ["ready", 7, 8, 9]


async def test_a_new_stream_resumes_with_last_event_id_in_the_query(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    """A new EventSource (after a ticket expired, say) cannot send the header."""
    api = await make_api()
    seqs = await publish(ctx, *(event(subjects.UPLOADED, image=f"q{n}") for n in range(3)))
    stream = await open_stream(api, f"?last_event_id={seqs[0]}", **auth(reader))
    assert await stream.ids(seqs[-1]) == seqs[1:]


async def test_an_id_past_the_streams_end_starts_live_and_a_bad_one_is_refused(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    api = await make_api()
    watcher = await live_stream(api, **auth(reader))
    before = await publish(ctx, event(subjects.UPLOADED, image="x"))
    assert await watcher.ids(before[-1]) == before  # the hub has it
    stream = await live_stream(api, **auth(reader), **{"Last-Event-ID": "999999"})
    after = await publish(ctx, event(subjects.INGESTED, image="x"))
    assert await stream.ids(after[-1]) == after
    response = await api.get("/api/events", headers={**auth(reader), "Last-Event-ID": "x1"})
    assert response.status == 400
    assert "Last-Event-ID must be an event id" in (await response.json())["detail"]


# --- what is sent ---------------------------------------------------------------------------


async def test_filters_keep_one_images_or_one_jobs_events_and_progress(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    api = await make_api()
    by_image = await live_stream(api, "?image=mine", **auth(reader))
    by_job = await live_stream(api, "?job=j1", **auth(reader))
    both = await live_stream(api, "?image=mine&job=j2", **auth(reader))
    everything = await live_stream(api, **auth(reader))
    for job, step in (("j2", 1), ("j1", 2)):
        report = {"stage": "generate", "job_id": job, "image_id": None, "step": step, "total": 4}
        await ctx.nc.publish(ctx.names.progress(job), orjson.dumps(report))
    seqs = await publish(
        ctx,
        event(subjects.UPLOADED, image="other"),
        event(subjects.UPLOADED, image="mine"),
        event(subjects.REQUESTED, job="j2"),
        event(subjects.REQUESTED, job="j1"),
        event(subjects.GENERATED, image="mine", job="j2"),
        event("failed.generate", job="j1"),
    )
    # Last, one event for each filter: what came before it is all that stream will get.
    ends = await publish(
        ctx,
        event(subjects.CAPTIONED, image="mine", job="j1"),
        event(subjects.CAPTIONED, image="mine", job="j2"),
    )
    streams = {"image": by_image, "job": by_job, "both": both, "all": everything}
    last = {"image": ends[1], "job": ends[0], "both": ends[1], "all": ends[1]}
    frames = {name: await s.to_id(last[name]) for name, s in streams.items()}
    # Progress and stored events travel apart: each kind is compared in its own order.
    stored = {name: [int(f["id"]) for f in got if "id" in f] for name, got in frames.items()}
    assert stored["image"] == [seqs[1], seqs[4], *ends]
    assert stored["job"] == [seqs[3], seqs[5], ends[0]]
    assert stored["both"] == [seqs[4], ends[1]]
    assert stored["all"] == [*seqs, *ends]
    progress = {
        name: [orjson.loads(f["data"])["job_id"] for f in got if f.get("event") == "progress"]
        for name, got in frames.items()
    }
    # The job stream sees j1's report, published after j2's on the same path, and not j2's.
    assert progress["job"] == ["j1"]
    assert progress["image"] == []


async def test_progress_has_no_id_and_events_carry_no_embedding_vectors(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    api = await make_api()
    stream = await live_stream(api, "?job=j9", **auth(reader))
    report = {
        "stage": "generate",
        "event_id": "requested-j9",
        "job_id": "j9",
        "image_id": None,
        "step": 3,
        "total": 8,
        "message": "denoising",
        "time": now_iso(),
        "preview_type": "image/jpeg",
        "preview_b64": base64.b64encode(b"jpeg").decode(),
    }
    await ctx.nc.publish(ctx.names.progress("j9"), orjson.dumps(report))
    frame = await stream.frame()
    assert frame.keys() == {"event", "data"}  # no id: nothing to resume from
    assert orjson.loads(frame["data"]) == {
        "step": 3,
        "total": 8,
        "stage": "generate",
        "job_id": "j9",
        "image_id": None,
        "message": "denoising",
        "time": report["time"],
        "preview": "data:image/jpeg;base64," + base64.b64encode(b"jpeg").decode(),
    }
    embeddings = [
        {"kind": "image", "model": "siglip", "vector": [0.5] * 768},
        {"kind": "text", "model": "minilm", "vector": [0.25] * 384},
    ]
    seq = await publish(
        ctx, event(subjects.CAPTIONED, job="j9", caption="a fox", embeddings=embeddings)
    )
    frame = await stream.frame()
    assert frame["id"] == str(seq[0]) and frame["event"] == "captioned"
    data = orjson.loads(frame["data"])["data"]
    assert data["caption"] == "a fox"
    assert data["embeddings"] == [
        {"kind": "image", "model": "siglip", "dims": 768},
        {"kind": "text", "model": "minilm", "dims": 384},
    ]


async def test_a_heartbeat_comment_keeps_a_quiet_stream_open(
    make_api: MakeApi, reader: str
) -> None:
    api = await make_api(heartbeat_s=0.05)
    stream = await live_stream(api, **auth(reader))
    assert await stream.frame() == {"comment": "ping"}
    head = await api.head("/api/events", headers=auth(reader))
    assert head.status == 200 and head.content_type == "text/event-stream"


async def test_a_gateway_shutting_down_ends_each_stream_saying_why(
    make_api: MakeApi, reader: str
) -> None:
    api = await make_api()
    stream = await live_stream(api, **auth(reader))
    await shutdown(api.server.app)  # what aiohttp runs before it waits for the handlers
    last = await stream.frame()
    assert last["event"] == "error" and "shutting down" in orjson.loads(last["data"])["detail"]
    with pytest.raises(EOFError):
        await stream.frame()
    assert hub(api).clients == 0 and hub(api).dropped == 0  # not counted as too slow
    # A stream that comes in meanwhile (the server still finishing its handlers) ends at
    # once, rather than running until the server's shutdown timeout cuts it.
    late = await open_stream(api, **auth(reader))
    frames = await late.until("error")
    assert [f["event"] for f in frames] == ["error"]
    assert "shutting down" in orjson.loads(frames[-1]["data"])["detail"]
    with pytest.raises(EOFError):
        await late.frame()


async def test_a_client_that_hangs_up_while_events_flow_ends_quietly(
    ctx: Context, make_api: MakeApi, reader: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A closed tab is routine: its stream ends without an error in the log."""
    api = await make_api()
    stream = await live_stream(api, **auth(reader))
    stream.close()
    # Events until the hub has let the client go: its writes failed, or the heartbeat saw it.
    with caplog.at_level(logging.WARNING):
        for n in itertools.count():
            await publish(ctx, event(subjects.UPLOADED, image=f"gone{n}"))
            if hub(api).clients == 0:
                break
            await asyncio.sleep(0.02)
    assert hub(api).dropped == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- fan-out ------------------------------------------------------------------------------


async def test_a_slow_client_is_dropped_and_does_not_stall_a_fast_one(
    ctx: Context, make_api: MakeApi, reader: str
) -> None:
    """The slow client never reads: once the kernel's buffers and its queue are full, the
    hub drops it, while the fast one gets every event. Events are published until the hub
    says it dropped one (the mechanism, not a clock, decides when)."""
    queue = 32
    api = await make_api(queue=queue)
    slow = await _raw_stream(api, reader)
    fast = await live_stream(api, **auth(reader))
    assert hub(api).clients == 2
    padding = "x" * 32_768
    published: list[int] = []
    fast_frames = asyncio.create_task(fast.until("requested"))  # reads as events come
    for n in range(2000):  # ~64 MB at most; far more than any socket buffers
        published += await publish(ctx, event(subjects.UPLOADED, image=f"s{n}", pad=padding))
        if hub(api).dropped:
            break
    assert hub(api).dropped == 1, "the slow client was never dropped"
    # A job's event: every key gets it (an image the gateway never met would count as held).
    sentinel = await publish(ctx, event(subjects.REQUESTED, job="end"))
    assert [int(f["id"]) for f in await fast_frames] == published + sentinel
    assert hub(api).clients == 1  # the fast one, still live
    # The slow one now reads what it was sent: a prefix of the events, then why it ended.
    body = await _read_to_end(slow)
    frames = [block for block in body.split("\n\n") if block]
    ids = [int(b.split("\n")[0][4:]) for b in frames if b.startswith("id: ")]
    assert ids == published[: len(ids)]
    assert frames[-1].startswith("event: error\ndata: ")
    detail = orjson.loads(frames[-1].split("data: ", 1)[1])["detail"]
    assert f"fell {queue} events behind" in detail


async def _raw_stream(api: Api, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream on a socket with a small receive buffer, read up to ``ready``, then left
    unread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (api.server.host, api.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    writer.write(
        f"GET /api/events HTTP/1.1\r\nHost: {api.server.host}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    async with asyncio.timeout(WAIT_S):
        await reader.readuntil(b"event: ready")
    return reader, writer


async def _read_to_end(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> str:
    """The rest of a raw chunked response, de-chunked, up to the connection's close."""
    reader, writer = stream
    async with asyncio.timeout(WAIT_S):
        await reader.readuntil(b"\r\n")  # the rest of the chunk that held 'ready'
        raw = await reader.read()  # to EOF: the gateway closes a stream it dropped
    writer.close()
    body, rest = [], raw
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16) if size else 0
        if length == 0:
            continue
        body.append(rest[:length])
        rest = rest[length + 2 :]
    return b"".join(body).decode()


# --- who sees what ------------------------------------------------------------------------

# Generated images wait for a decision, and every upload waits for its NSFW score (held
# above 0.7): an upload is pending until its caption comes.
HOLD = HoldPolicy(nsfw_above=0.7, generated=True)


def decided(topic: str, image: str, previous: str) -> Event:
    """A decision as the gateway publishes it (who, why, and what the image was before)."""
    return event(topic, image=image, decision=topic, previous=previous, by="k1", reason="why")


def stored_ids(frames: list[dict[str, str]]) -> list[int]:
    return [int(f["id"]) for f in frames if "id" in f]


class TestHeldImages:
    """A key without the admin scope gets no event about a pending or rejected image; an
    admin key gets every one. The last event each test waits for is one the read key gets:
    what came before it is all its stream will ever have of them."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"approval": ApprovalSettings(hold=HOLD)})

    async def test_a_read_key_gets_no_events_of_a_held_image_until_it_is_approved(
        self, ctx: Context, make_api: MakeApi, reader: str, admin: str
    ) -> None:
        api = await make_api()
        viewer = await live_stream(api, **auth(reader))
        everything = await live_stream(api, **auth(admin))
        # A generation job's progress is about the job: every key gets it, even though the
        # policy holds the image it makes.
        report = {"stage": "generate", "job_id": "j1", "image_id": None, "step": 1, "total": 4}
        await ctx.nc.publish(ctx.names.progress("j1"), orjson.dumps(report))
        for stream in (viewer, everything):
            frame = await stream.frame()
            assert frame["event"] == "progress" and orjson.loads(frame["data"])["job_id"] == "j1"
        held = await publish(
            ctx,
            event(subjects.GENERATED, image="gen1", job="j1", name="0.png"),
            event(subjects.UPLOADED, image="risky", name="a.jpg", source="gateway"),
            event(subjects.INGESTED, image="risky", width=4, height=3),
            event(subjects.CAPTIONED, image="risky", caption="a secret", nsfw=0.93),
            event(subjects.UPLOADED, image="safe", name="b.jpg", source="gateway"),
        )
        shown = await publish(
            ctx,
            event(subjects.CAPTIONED, image="safe", caption="a cat", nsfw=0.01),  # now shown
            event(subjects.REQUESTED, job="j2"),  # about no image
            decided(subjects.APPROVED, "gen1", "pending"),  # the image appears
            event(subjects.INGESTED, image="gen1", width=8, height=8),
        )
        frames = await viewer.to_id(shown[-1])
        assert stored_ids(frames) == shown
        assert [f["event"] for f in frames] == ["captioned", "requested", "approved", "ingested"]
        assert all("a secret" not in f["data"] for f in frames)
        assert stored_ids(await everything.to_id(shown[-1])) == sorted(held + shown)

    async def test_a_rejection_reaches_the_keys_that_saw_the_image_and_then_nothing_of_it(
        self, ctx: Context, make_api: MakeApi, reader: str, admin: str
    ) -> None:
        api = await make_api()
        viewer = await live_stream(api, **auth(reader))
        everything = await live_stream(api, **auth(admin))
        seqs = await publish(
            ctx,
            event(subjects.UPLOADED, image="seen", name="a.jpg", source="gateway"),
            event(subjects.CAPTIONED, image="seen", caption="a dog", nsfw=0.01),
            event(subjects.GENERATED, image="unseen", job="j1", name="0.png"),
            decided(subjects.REJECTED, "seen", "none"),  # it disappears: why
            event(subjects.INGESTED, image="seen", width=4, height=3),  # rejected now
            decided(subjects.REJECTED, "unseen", "pending"),  # never shown: nothing to say
            event(subjects.DELETED, image="unseen"),
            event(subjects.DELETED, image="seen"),
            event(subjects.REQUESTED, job="j2"),
        )
        frames = await viewer.to_id(seqs[-1])
        assert stored_ids(frames) == [seqs[1], seqs[3], seqs[-1]]
        rejected = orjson.loads(frames[1]["data"])
        assert rejected["type"] == "rejected" and rejected["image_id"] == "seen"
        assert stored_ids(await everything.to_id(seqs[-1])) == seqs

    async def test_a_read_keys_resume_leaves_out_held_images_from_the_buffer_and_the_stream(
        self, ctx: Context, make_api: MakeApi, reader: str, admin: str
    ) -> None:
        """Resumed from before the hub's buffer (4 events), the older events are judged by
        their image's approval now: an image shown now (its caption came) shows its earlier
        upload too. From within the buffer, and live, as ever."""
        api = await make_api(buffer=4)
        stream = await live_stream(api, **auth(reader))
        everything = await live_stream(api, **auth(admin))
        first = await publish(ctx, event(subjects.REQUESTED, job="j0"))
        assert await stream.ids(first[-1]) == first
        stream.close()
        seqs = await publish(
            ctx,
            event(subjects.GENERATED, image="g1", job="j1", name="0.png"),
            event(subjects.UPLOADED, image="s1", name="a.jpg", source="gateway"),
            event(subjects.CAPTIONED, image="s1", caption="a cat", nsfw=0.01),
            event(subjects.GENERATED, image="g2", job="j1", name="1.png"),
            event(subjects.INGESTED, image="g1", width=8, height=8),
            event(subjects.REQUESTED, job="j3"),
            event(subjects.INGESTED, image="s1", width=4, height=3),
        )
        # Once the admin's stream has the last, the hub has judged them all.
        assert await everything.ids(seqs[-1]) == first + seqs
        resume = {"Last-Event-ID": str(first[-1])}
        from_stream = await open_stream(api, **auth(reader), **resume)
        assert await from_stream.ids(seqs[-1]) == [seqs[1], seqs[2], seqs[5], seqs[6]]
        admin_resumed = await open_stream(api, **auth(admin), **resume)
        assert await admin_resumed.ids(seqs[-1]) == seqs
        from_buffer = await open_stream(api, **auth(reader), **{"Last-Event-ID": str(seqs[2])})
        later = await publish(
            ctx,
            decided(subjects.APPROVED, "g1", "pending"),
            event(subjects.CAPTIONED, image="g1", caption="a fox", nsfw=0.01),
            event(subjects.CAPTIONED, image="g2", caption="an owl", nsfw=0.01),  # still held
            event(subjects.REQUESTED, job="j4"),
        )
        assert await from_buffer.ids(later[-1]) == [seqs[5], seqs[6], *later[:2], later[3]]

    async def test_the_hub_asks_the_read_model_about_images_it_has_not_met(
        self,
        ctx: Context,
        make_api: MakeApi,
        reader: str,
        admin: str,
        run_function: Callable[..., Awaitable[object]],
    ) -> None:
        """Images that came before the gateway started: their approval is in the read
        model (notify projects it), for live events and for a resume from the stream."""
        assert ctx.db is not None
        db = ctx.db
        await run_function(load("notify"))
        before = await publish(
            ctx,
            event(subjects.GENERATED, image="gen1", job="j1", name="0.png", index=0),
            event(subjects.UPLOADED, image="waits", name="a.jpg", source="gateway"),
            event(subjects.UPLOADED, image="also", name="b.jpg", source="gateway"),
            event(subjects.UPLOADED, image="old", name="c.jpg", source="gateway"),
            event(subjects.CAPTIONED, image="old", caption="a boat", nsfw=0.01),
            event(subjects.GENERATED, image="gen2", job="j1", name="1.png", index=1),
        )
        for image_id, approval in (
            ("gen1", "pending"),
            ("waits", "pending"),
            ("also", "pending"),
            ("old", "none"),
            ("gen2", "pending"),
        ):

            async def projected(image_id: str = image_id, approval: str = approval) -> bool:
                doc = await db.get(image_id)
                return doc is not None and doc["approval"] == approval

            await eventually(projected, timeout=WAIT_S, what=f"notify projected {image_id}")
        api = await make_api()
        viewer = await live_stream(api, **auth(reader))
        everything = await live_stream(api, **auth(admin))
        after = await publish(
            ctx,
            event(subjects.CAPTIONED, image="waits", caption="a cat", nsfw=0.01),  # shown now
            event(subjects.CAPTIONED, image="gen1", caption="a fox", nsfw=0.01),  # generated
            event(subjects.INGESTED, image="also", width=4, height=3),  # still waits
            event(subjects.REQUESTED, job="j2"),
        )
        assert await viewer.ids(after[-1]) == [after[0], after[3]]
        assert await everything.ids(after[-1]) == after
        resumed = await open_stream(api, **auth(reader), **{"Last-Event-ID": "0"})
        assert await resumed.ids(after[-1]) == [before[1], before[3], before[4], after[0], after[3]]


# --- authentication -----------------------------------------------------------------------


async def test_the_route_refuses_requests_without_key_session_or_ticket(
    make_api: MakeApi, reader: str, make_key: Callable[..., Awaitable[str]]
) -> None:
    api = await make_api()
    for query, words in (
        ("", "send an API key"),
        ("?ticket=" + "t" * 43, "this ticket is unknown, used or expired"),
        (f"?ticket={reader}", "an API key never goes in a URL"),
    ):
        response = await api.get(f"/api/events{query}")
        assert response.status == 401, query
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert words in (await response.json())["detail"]
    uploader = await make_key("upload")
    response = await api.get("/api/events", headers=auth(uploader))
    assert response.status == 403


async def test_a_ticket_works_once(make_api: MakeApi, reader: str) -> None:
    api = await make_api()
    response = await api.post("/api/events/ticket", headers=auth(reader))
    assert response.status == 201
    issued = await response.json()
    assert issued["expires_in"] == 60
    stream = await live_stream(api, f"?ticket={issued['ticket']}")
    stream.close()
    again = await api.get(f"/api/events?ticket={issued['ticket']}")
    assert again.status == 401
    # Past its time, a ticket never used is refused as well.
    api.server.app[BROWSERS].ticket_ttl = 0
    stale = await (await api.post("/api/events/ticket", headers=auth(reader))).json()
    assert (await api.get(f"/api/events?ticket={stale['ticket']}")).status == 401


async def sign_in(api: Api, token: str, **headers: str) -> tuple[str, ClientResponse]:
    """A session for ``token``: the cookie's value, and the answer that set it."""
    response = await api.post("/api/session", headers={**auth(token), **headers})
    assert response.status == 201, await response.text()
    session = response.cookies[COOKIE].value
    api.session.cookie_jar.clear()  # each request below says which cookie it sends
    return session, response


def cookie(session: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session}", **headers}


async def test_a_session_cookie_stands_for_its_key_until_signed_out_or_revoked(
    make_api: MakeApi, make_key: Callable[..., Awaitable[str]], admin: str
) -> None:
    api = await make_api()
    token = await make_key("read")
    session, response = await sign_in(api, token)
    set_cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert "Path=/" in set_cookie and "Secure" not in set_cookie  # plain http here
    doc = await response.json()
    assert doc["scopes"] == ["read"] and doc["key_id"] == token.split("_")[1]
    _, behind_tls = await sign_in(api, token, **{"X-Forwarded-Proto": "https"})
    assert "Secure" in behind_tls.headers["Set-Cookie"]

    assert (await api.get("/api/images", headers=cookie(session))).status == 200
    me = await api.get("/api/session", headers=cookie(session))  # what a page asks at start
    assert me.status == 200
    assert await me.json() == doc
    with_key = await (await api.get("/api/session", headers=auth(token))).json()
    assert with_key["scopes"] == ["read"] and with_key["expires"] is None
    stream = await live_stream(api, **cookie(session))
    stream.close()
    # Its key's scopes, no more.
    assert (await api.get("/api/keys", headers=cookie(session))).status == 403
    # A change made with the cookie must come from this origin.
    for headers in ({}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
        refused = await api.post("/api/events/ticket", headers=cookie(session, **headers))
        assert refused.status == 403, headers
        assert "same-origin" in (await refused.json())["detail"]
    origin = f"http://{api.server.host}:{api.server.port}"
    for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Origin": origin}):
        allowed = await api.post("/api/events/ticket", headers=cookie(session, **headers))
        assert allowed.status == 201, headers
    # A session is made from a key, not from another session.
    renewed = await api.post("/api/session", headers=cookie(session, Origin=origin))
    assert renewed.status == 403

    signed_out = await api.delete("/api/session", headers=cookie(session, Origin=origin))
    assert signed_out.status == 204
    assert signed_out.cookies[COOKIE].value == ""
    ended = await api.get("/api/images", headers=cookie(session))
    assert ended.status == 401
    assert "this session has ended" in (await ended.json())["detail"]
    assert (await api.get("/api/session", headers=cookie(session))).status == 401

    other, _ = await sign_in(api, token)
    assert (await api.get("/api/images", headers=cookie(other))).status == 200
    key_id = token.split("_")[1]
    assert (await api.delete(f"/api/keys/{key_id}", headers=auth(admin))).status == 204
    assert (await api.get("/api/images", headers=cookie(other))).status == 401
    assert (await api.get("/api/events", headers=cookie(other))).status == 401
