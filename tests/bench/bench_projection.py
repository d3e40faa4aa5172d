"""Read-your-event on the live stream: what waiting for notify's projection costs and buys.

Run with ``python -m tests.bench.bench_projection [--events 600] [--rate 50] [--quick]``. The
last line printed is JSON.

Method
------
One run starts the embedded PostgreSQL, nats-server and SeaweedFS in a temporary directory,
as ``bench_notify`` does, and on them:

* **notify** as a ``darkroom worker notify`` process, as ``darkroom up`` runs it: its writes
  then use a core and an event loop of their own, not the gateway's (in-process, every poll
  of the gate and every SSE write would queue behind notify's handlers, and the other way
  round, which no deployment does).
* **the gateway** built in this process (``build_app`` on a database context, served by its
  own ``AppRunner`` on a free TCP port), so that each run can set
  ``Options.projection_wait_s``; the client below reaches it over TCP like any other.

Two runs, one after the other on the same servers and the same notify: **baseline** with
``projection_wait_s=0`` (no gate: an event goes out as soon as the hub reads it), then
**gate** with the default (2.0 s). Each run opens one stream on ``GET /api/events`` with an
admin key, warms up (one image's three events, heard and projected), then publishes
``--events`` lifecycle events (``uploaded``, ``ingested``, ``captioned`` of image after image,
fresh image ids per run, ``bench_notify``'s ``lifecycle_event``) at a steady ``--rate``. For
each ``ingested`` or ``captioned`` event heard, the client at once fetches
``GET /api/images/{id}`` with the same key and checks that the document reflects it (an
``ingest``, respectively a ``caption``, in it; a 404 reflects nothing).

Reported per run: delivery latency p50/p99/max (the publish call to the SSE receipt of its
``id:`` line, both ``time.monotonic()``), ``read_your_event_ratio`` (of the checked events,
those the document already reflected), the events published, heard and checked, the fetch
time, and how many events the gate let go after waiting its full ``projection_wait_s`` (it
logs each). Between the runs notify catches up (nothing pending on its consumer), so the
gate run does not start behind. ``delta`` is gate minus baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bus.core import subjects
from bus.core.settings import Settings
from bus.gateway.app import build_app, make_app_runner
from bus.gateway.events import OPTIONS, PATH, PROJECTION_WAIT_S, Options
from bus.gateway.projection import NOTIFY
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.ops.pgserver import PostgresServer
from bus.runtime.context import Context, open_context
from bus.state.keys import create_key
from tests.bench.bench_notify import LIFECYCLE, lifecycle_event, publish_steadily
from tests.bench.report import load_average, percentile, rounded, run_and_report, shown
from tests.bench.stack import server_settings

# What each checked event must have put in its image's document.
REFLECTS = {subjects.INGESTED: "ingest", subjects.CAPTIONED: "caption"}
WORKER_START_S = 60.0  # the longest wait for notify's worker to say it started
CATCH_UP_S = 60.0  # the longest wait for notify to have nothing pending
POLL_S = 0.05
STALLED = "notify has not projected event"  # the gate's warning when a wait ran out


# --- notify, a process of its own -------------------------------------------------------------


def worker_env(settings: Settings) -> dict[str, str]:
    """``settings`` as a darkroom process reads them from its environment."""
    assert settings.s3.secret_key is not None and settings.postgres.url is not None
    return {
        **os.environ,
        "DARKROOM_NAMESPACE": settings.namespace,
        "DARKROOM_DATA_DIR": str(settings.data_dir),
        "DARKROOM_NATS__URL": settings.nats.url or "",
        "DARKROOM_S3__ENDPOINT": settings.s3.endpoint or "",
        "DARKROOM_S3__ACCESS_KEY": settings.s3.access_key or "",
        "DARKROOM_S3__SECRET_KEY": settings.s3.secret_key.get_secret_value(),
        "DARKROOM_S3__BUCKET": settings.s3.bucket,
        "DARKROOM_POSTGRES__URL": settings.postgres.url.get_secret_value(),
        "DARKROOM_LOG_LEVEL": "info",
    }


@contextlib.asynccontextmanager
async def notify_worker(settings: Settings) -> AsyncIterator[asyncio.subprocess.Process]:
    """A ``darkroom worker notify`` process, from the moment it says it started."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bus.ops.cli",
        "worker",
        NOTIFY,
        env=worker_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        seen: list[str] = []
        async with asyncio.timeout(WORKER_START_S):
            while line := (await proc.stderr.readline()).decode(errors="replace"):
                seen.append(line.rstrip())
                if f"worker {NOTIFY} started" in line:
                    break
            else:
                raise RuntimeError("notify's worker exited: " + " | ".join(seen[-5:]))
        drain = asyncio.create_task(_discard(proc.stderr))
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        if drain is not None:
            await drain


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def caught_up(ctx: Context) -> None:
    """Return once notify's consumer has nothing pending and nothing in hand."""
    async with asyncio.timeout(CATCH_UP_S):
        while True:
            info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable(NOTIFY))
            if not info.num_pending and not info.num_ack_pending:
                return
            await asyncio.sleep(POLL_S)


class Stalls(logging.Handler):
    """Counts the events the gate let go after waiting for them in vain."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(STALLED):
            self.count += 1


# --- the gateway and its one client ------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway(ctx: Context, wait_s: float) -> AsyncIterator[str]:
    """The gateway in this process, its streams waiting up to ``wait_s`` for notify; its URL."""
    app = build_app(ctx)
    app[OPTIONS] = Options(projection_wait_s=wait_s)
    runner = make_app_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Check:
    """One heard ``ingested``/``captioned`` event, and whether its document showed it."""

    topic: str
    reflected: bool
    fetch_ms: float


@dataclass
class Listener:
    """One stream on ``GET /api/events``: when each event was heard, and the document
    checks its ``ingested``/``captioned`` events set off."""

    session: aiohttp.ClientSession
    url: str
    key: str
    heard: dict[int, float] = field(default_factory=dict)  # stream sequence -> receipt time
    checks: dict[int, Check] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # or the stream ended
    ended: bool = False
    _fetches: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def listen(self) -> None:
        """Read the stream until cancelled."""
        try:
            await self._read()
        finally:
            self.ended = True
            self.ready.set()

    async def _read(self) -> None:
        headers = {**self.auth, "Accept": "text/event-stream"}
        async with self.session.get(self.url + PATH, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{PATH} answered {resp.status}: {await resp.text()}")
            seq: int | None = None
            topic = data = ""
            while line := await resp.content.readline():
                text = line.decode().rstrip("\r\n")
                if text.startswith("id: "):
                    seq = int(text[4:])
                    self.heard[seq] = time.monotonic()
                elif text.startswith("event: "):
                    topic = text[7:]
                elif text.startswith("data: "):
                    data = text[6:]
                elif not text:  # the frame is complete
                    if topic == "ready":
                        self.ready.set()
                    elif seq is not None and topic in REFLECTS:
                        image_id = orjson.loads(data).get("image_id")
                        fetch = asyncio.create_task(self._check(seq, topic, str(image_id)))
                        self._fetches.add(fetch)
                        fetch.add_done_callback(self._fetches.discard)
                    seq, topic, data = None, "", ""
        raise RuntimeError("the event stream ended")

    async def _check(self, seq: int, topic: str, image_id: str) -> None:
        started = time.monotonic()
        async with self.session.get(f"{self.url}/api/images/{image_id}", headers=self.auth) as r:
            doc = await r.json() if r.status == 200 else {}
        ms = (time.monotonic() - started) * 1000
        self.checks[seq] = Check(topic, REFLECTS[topic] in doc, ms)

    async def has(self, seqs: set[int], timeout: float) -> bool:
        """Whether every event of ``seqs`` is heard, and checked if it is to be, in time."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not seqs <= self.heard.keys() or self._fetches:
                    if self.ended:
                        return False
                    await asyncio.sleep(POLL_S)
                return True
        return False


# --- one run ------------------------------------------------------------------------------------


async def measure(
    ctx: Context, key: str, label: str, wait_s: float, stalls: Stalls, opts: argparse.Namespace
) -> dict[str, Any]:
    """One run: a gateway waiting up to ``wait_s``, one stream, ``opts.events`` events."""
    await caught_up(ctx)  # the run before this one must not hold notify up
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with gateway(ctx, wait_s) as url, aiohttp.ClientSession(timeout=timeout) as session:
        listener = Listener(session, url, key)
        reading = asyncio.create_task(listener.listen())
        try:
            await asyncio.wait_for(listener.ready.wait(), opts.drain)
            if reading.done():
                reading.result()  # the stream failed: say why
            warm = set()
            for n in range(len(LIFECYCLE)):  # one image's lifecycle, heard and projected
                event = lifecycle_event(f"w{label[0]}", n)
                ack = await ctx.js.publish(ctx.names.subject(event.type), event.encode())
                warm.add(ack.seq)
            if not await listener.has(warm, opts.drain):
                raise RuntimeError(f"{label}: the warm-up events did not arrive")
            await caught_up(ctx)
            stalled = stalls.count
            published = await publish_steadily(
                ctx.js, ctx.names, f"{label[0]}r", opts.rate, opts.events / opts.rate
            )
            complete = await listener.has(set(published.sent), opts.drain)
            stalled = stalls.count - stalled
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    latencies = [
        (listener.heard[seq] - at) * 1000
        for seq, at in published.sent.items()
        if seq in listener.heard
    ]
    checks = [listener.checks[seq] for seq in published.sent if seq in listener.checks]
    ordered = sorted(latencies)
    return {
        "projection_wait_s": wait_s,
        "events": len(published.sent),
        "heard": len(latencies),
        "complete": complete,
        "publish_rate": rounded(published.rate, 1),
        "publish_late_max_ms": rounded(published.late_max_ms, 1),
        "p50_ms": rounded(percentile(ordered, 50), 1),
        "p99_ms": rounded(percentile(ordered, 99), 1),
        "max_ms": rounded(ordered[-1] if ordered else float("nan"), 1),
        "checked": len(checks),
        "reflected": sum(c.reflected for c in checks),
        "read_your_event_ratio": _ratio(checks),
        "read_your_event_by_topic": {
            topic: _ratio([c for c in checks if c.topic == topic]) for topic in REFLECTS
        },
        "fetch_p50_ms": rounded(percentile([c.fetch_ms for c in checks], 50), 1),
        "gate_waits_ran_out": stalled,
    }


def _ratio(checks: list[Check]) -> float | None:
    return rounded(sum(c.reflected for c in checks) / len(checks), 4) if checks else None


# --- the run ------------------------------------------------------------------------------------


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    load = load_average()
    stalls = Stalls()
    logging.getLogger("darkroom.events").addHandler(stalls)
    runs: dict[str, dict[str, Any]] = {}
    root = Path(tempfile.mkdtemp(prefix="bench-projection-"))
    try:
        pg = PostgresServer(root / "pg", port=0)
        nats_server = NatsServer(root / "nats", port=0)
        weed = SeaweedFS(root / "s3", S3Credentials.load_or_create(root / "s3" / "s3.json"), port=0)
        await asyncio.gather(pg.start(), nats_server.start(), weed.start())
        try:
            settings = server_settings(root / "data", pg, nats_server, weed, "bench-projection")
            async with open_context(settings, [], "bench-gateway", database=True) as ctx:
                key, _ = await create_key(ctx.api_keys, "bench", ("admin",))
                async with notify_worker(settings):
                    for label, wait_s in (("baseline", 0.0), ("gate", PROJECTION_WAIT_S)):
                        runs[label] = await measure(ctx, key, label, wait_s, stalls, opts)
                        _print_run(label, runs[label])
        finally:
            for child in (weed, nats_server, pg):
                await child.stop()
    finally:
        logging.getLogger("darkroom.events").removeHandler(stalls)
        shutil.rmtree(root, ignore_errors=True)
    base, gate = runs["baseline"], runs["gate"]
    delta = {
        name: _minus(gate[name], base[name])
        for name in ("p50_ms", "p99_ms", "max_ms", "read_your_event_ratio")
    }
    summary = {
        "events": opts.events,
        "rate": opts.rate,
        "notify": "a darkroom worker notify process",
        "baseline": base,
        "gate": gate,
        "delta": delta,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": load},
        "elapsed_s": rounded(time.perf_counter() - started, 1),
    }
    print(
        f"gate - baseline: latency p50/p99/max {shown(delta['p50_ms'])}/"
        f"{shown(delta['p99_ms'])}/{shown(delta['max_ms'])} ms, read-your-event ratio "
        f"{shown(delta['read_your_event_ratio'])}; load average {shown(load)} at the start",
        file=sys.stderr,
    )
    return summary


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _print_run(label: str, figures: dict[str, Any]) -> None:
    print(
        f"{label} (projection_wait_s={figures['projection_wait_s']:g}): "
        f"{figures['heard']}/{figures['events']} events heard at "
        f"{shown(figures['publish_rate'])}/s, latency p50/p99/max "
        f"{shown(figures['p50_ms'])}/{shown(figures['p99_ms'])}/{shown(figures['max_ms'])} ms; "
        f"read-your-event {figures['reflected']}/{figures['checked']} "
        f"({shown(figures['read_your_event_ratio'])}), fetch p50 "
        f"{shown(figures['fetch_p50_ms'])} ms; gate waits that ran out: "
        f"{figures['gate_waits_ran_out']}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=600, help="events published per run")
    parser.add_argument("--rate", type=float, default=50.0, help="events published a second")
    parser.add_argument(
        "--drain", type=float, default=30.0, help="the longest wait for the last event"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.events = min(opts.events, 150)
    if opts.events < 1 or opts.rate <= 0 or opts.drain <= 0:
        parser.error("--events, --rate and --drain must be positive")
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
