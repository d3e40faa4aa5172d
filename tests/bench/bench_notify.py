"""Notify under load: Server-Sent Events fanned out to many subscribers, and webhooks.

Run with ``python -m tests.bench.bench_notify [--subscribers 1000] [--rate 100]
[--duration 20] [--quick]``. The last line printed is JSON.

Method
------
One run starts the embedded PostgreSQL, nats-server and SeaweedFS in a temporary directory
and a real ``darkroom gateway`` process on them (namespace ``bench``, with a key of scope
``read``: what a dashboard holds), as ``bench_readmodel`` does.

* **SSE fan-out.** Subscriber processes (``--client-procs``, spawned with multiprocessing,
  so the clients share neither the gateway's event loop nor the publisher's) open
  ``--subscribers`` streams on the one gateway's ``GET /api/events``, a non-browser client's
  way: ``Authorization: Bearer <key>``. Once every stream has said ``ready``, this process
  publishes lifecycle events (``uploaded``, ``ingested``, ``captioned`` of one image after
  another) into the stream at a steady ``--rate`` for ``--duration`` seconds, noting each
  event's send time by its stream sequence (its SSE ``id:``). Each subscriber is a plain
  asyncio protocol that notes the receive time of every ``id:`` line as the bytes come,
  nothing more parsed: aiohttp's client cost 2 to 2.5 times as much CPU per event, and on
  2 cores every microsecond the clients spend is one the gateway does not get.
  Both clocks are ``time.monotonic()``, which on Linux is one clock for the whole machine.
  After the last event, the subscribers wait for it (at most ``--drain`` seconds).
  Reported: the delivery latency p50/p99/max over every (event, subscriber) pair; the event
  rate each subscriber sustained (its events over the span from the first send to the last
  receive); how many subscribers the gateway dropped for falling behind; the CPU the
  gateway and the clients used over the span, in cores (near 1 is a saturated event loop)
  and per delivery, and the whole machine's (``machine_cpu_cores`` near the core count
  with our processes well below it: other work took the CPU, read the rest with that).
* **Baseline, same run.** The same with one subscriber, first.
* **Webhooks.** ``webhook_figures`` from ``tests/bench/bench_webhooks.py`` (signed
  deliveries per second to a local receiver, and the time to drain a backlog after an
  outage), on the same servers once the gateway has stopped; its fields are null, with a
  note, when that module is not there or fails.

Goals on this machine: 1,000 subscribers at 100 events/s with delivery p99 <= 250 ms;
>= 500 signed deliveries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.js import JetStreamContext

from bus.core import subjects
from bus.core.envelope import Event, new_id, now_iso
from bus.core.subjects import Names
from bus.gateway.events import PATH
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.ops.pgserver import PostgresServer
from tests.bench.bench_readmodel import SCHEMA
from tests.bench.report import load_average, percentile, rounded, run_and_report, shown
from tests.bench.stack import server_settings, start_gateway

GOALS = {"sse_subscribers": 1000, "sse_events_per_s": 100, "sse_p99_ms": 250.0}
WEBHOOK_GOAL_PER_S = 500
CONNECT_AT_ONCE = 50  # streams being opened at the same time (the gateway's listen backlog)
READY_TIMEOUT_S = 120.0  # the longest wait for every stream's ``ready``
LIFECYCLE = (subjects.UPLOADED, subjects.INGESTED, subjects.CAPTIONED)
# The only lines a subscriber looks at: an event's id, and the stream's own frames. Led by
# its newline rather than ``^`` in multiline mode, which is 2.5 times slower.
LINE = re.compile(rb"\n(?:id: (\d+)|event: (ready|error))(?=\r?\n)")


# --- the subscribers (a process of their own) --------------------------------------------------


class Subscriber(asyncio.Protocol):
    """One stream, read the cheapest way Python offers: a plain HTTP/1.1 GET on a socket of
    its own, and each read scanned for ids right in ``data_received`` (no task wakes up per
    read, no body stream in between). The body is chunked; its chunk-size lines pass
    through as lines of their own, which the scan skips, because the gateway writes whole
    frames into each chunk. Every id is noted with the time its read arrived."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.seqs = array("q")
        self.times = array("d")
        self.ready = asyncio.Event()
        self.done = asyncio.Event()  # it has the last event, or its stream ended
        self.last = sys.maxsize  # the last event's id, once it is out
        self.dropped: str | None = None  # why the stream ended before the run did
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self._head: bytes | None = b""  # the response head until it is complete, then None
        self._rest = b"\n"  # from the last newline read on: each line is led by one

    def expect(self, last: int) -> None:
        self.last = last
        if self.finished():
            self.done.set()

    def finished(self) -> bool:
        return self.dropped is not None or (bool(self.seqs) and self.seqs[-1] >= self.last)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.dropped is None:
            self.dropped = f"the stream ended ({exc or 'closed by the gateway'})"
        self.ready.set()  # a stream that never got there is not waited for
        self.done.set()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self._head[: self._head.find(b"\r\n")].decode(errors="replace")
            if status.split()[1:2] != ["200"]:
                self.dropped = f"the gateway answered {status!r}"
                self.close()
                return
            data, self._head = self._head[end + 2 :], None
        data = self._rest + data
        cut = data.rfind(b"\n")  # whole lines only; the rest waits for the next read
        self._rest = data[cut:]
        for match in LINE.finditer(data, 0, cut + 1):
            seq, control = match.groups()
            if seq is not None:
                self.seqs.append(number := int(seq))
                self.times.append(now)
                if number >= self.last:
                    self.done.set()
            elif control == b"ready":
                self.ready.set()
            else:
                self.dropped = "the gateway dropped it (event: error)"


async def _open(subscriber: Subscriber, host: str, port: int, gate: asyncio.Semaphore) -> None:
    """Connect ``subscriber``; at most ``CONNECT_AT_ONCE`` streams are being opened at once."""
    async with gate:
        try:
            await asyncio.get_running_loop().create_connection(lambda: subscriber, host, port)
        except OSError as exc:
            subscriber.dropped = f"could not connect: {exc}"
            subscriber.connection_lost(None)
        await subscriber.ready.wait()


def subscriber_process(url: str, key: str, count: int, conn: Connection) -> None:
    """A child process: ``count`` streams on ``url``, driven by messages on ``conn``."""
    asyncio.run(_subscribe(url, key, count, conn))


async def _subscribe(url: str, key: str, count: int, conn: Connection) -> None:
    where = urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: Bearer {key}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    subscribers = [Subscriber(request) for _ in range(count)]
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(READY_TIMEOUT_S):
            await asyncio.gather(*(_open(s, host, port, gate) for s in subscribers))
    not_ready = sum(not s.ready.is_set() or s.dropped is not None for s in subscribers)
    conn.send(("ready", time.monotonic() - started, not_ready))
    cpu = time.process_time()  # the events start now
    # Sent once the last event is out, with every event's send time.
    _, last, drain_s, sent = await asyncio.to_thread(conn.recv)
    for each in subscribers:
        each.expect(last)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(drain_s):
            await asyncio.gather(*(s.done.wait() for s in subscribers))
    cpu = time.process_time() - cpu
    conn.send(("drained",))
    for each in subscribers:
        each.close()
    conn.send(_tally(subscribers, sent, cpu))


def _tally(subscribers: list[Subscriber], sent: dict[int, float], cpu_s: float) -> dict[str, Any]:
    """What the subscribers of one process saw, against the publisher's send times."""
    latencies = array("d")
    received = duplicates = 0
    last_receive = 0.0
    for each in subscribers:
        seen: set[int] = set()
        for seq, at in zip(each.seqs, each.times, strict=True):
            if seq in sent:
                if seq in seen:
                    duplicates += 1
                    continue
                seen.add(seq)
                latencies.append((at - sent[seq]) * 1000)
                last_receive = max(last_receive, at)
        received += len(seen)
    reasons = Counter(s.dropped for s in subscribers if s.dropped is not None)
    return {
        "latencies_ms": latencies.tobytes(),
        "received": received,
        "duplicates": duplicates,
        "dropped": sum(reasons.values()),
        "drop_reasons": dict(reasons),
        "incomplete": sum(not s.finished() for s in subscribers),
        "last_receive": last_receive,
        "cpu_s": cpu_s,
    }


# --- the publisher and one run ------------------------------------------------------------------


def lifecycle_event(run: str, n: int) -> Event:
    """Event ``n`` of a run: image after image, each uploaded, ingested, then captioned."""
    image_id = f"{run}{n // 3:07d}"
    topic = LIFECYCLE[n % 3]
    data: dict[str, dict[str, Any]] = {
        subjects.UPLOADED: {"name": f"photo-{n // 3}.jpg", "source": "gateway"},
        subjects.INGESTED: {"width": 4000, "height": 3000, "exif": {"Model": "bench"}},
        subjects.CAPTIONED: {"caption": f"a bench photo {n // 3}", "tags": ["bench", "photo"]},
    }
    return Event(new_id(), topic, "bench", now_iso(), image_id=image_id, data=data[topic])


@dataclass
class Published:
    sent: dict[int, float]  # stream sequence -> monotonic send time
    rate: float  # achieved events/s
    late_max_ms: float  # the furthest a send fell behind its schedule


async def publish_steadily(
    js: JetStreamContext, names: Names, run: str, rate: float, duration: float
) -> Published:
    """``rate`` events a second for ``duration`` seconds, each at its scheduled time."""
    sent: dict[int, float] = {}
    late = 0.0
    start = time.monotonic()
    for n in range(max(1, round(rate * duration))):
        due = start + n / rate
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        event = lifecycle_event(run, n)
        at = time.monotonic()
        late = max(late, at - due)
        ack = await js.publish(
            names.subject(event.type), event.encode(), headers={"Nats-Msg-Id": event.id}
        )
        sent[ack.seq] = at
    span = max(sent.values()) - min(sent.values())
    achieved = (len(sent) - 1) / span if span > 0 else math.nan
    return Published(sent, achieved, late * 1000)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far, all cores together
    (Linux; NaN elsewhere): with the figures of our own processes it shows the contention."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def fan_out(
    url: str,
    key: str,
    js: JetStreamContext,
    gateway_pid: int,
    subscribers: int,
    opts: argparse.Namespace,
) -> dict[str, Any]:
    """One measured run: ``subscribers`` streams, events at ``opts.rate`` for
    ``opts.duration`` seconds."""
    procs = max(1, min(opts.client_procs, subscribers))
    shares = [subscribers // procs + (k < subscribers % procs) for k in range(procs)]
    spawn = multiprocessing.get_context("spawn")
    pipes, children = [], []
    for share in shares:
        parent, child = spawn.Pipe()
        process = spawn.Process(
            target=subscriber_process, args=(url, key, share, child), daemon=True
        )
        process.start()
        child.close()
        pipes.append(parent)
        children.append(process)
    try:
        readies = await asyncio.gather(*(asyncio.to_thread(p.recv) for p in pipes))
        not_ready = sum(r[2] for r in readies)
        if not_ready:
            raise RuntimeError(f"{not_ready} of {subscribers} streams did not open")
        gateway_cpu, machine_cpu = cpu_seconds(gateway_pid), machine_busy_seconds()
        load = load_average()
        publisher_cpu = time.process_time()
        published = await publish_steadily(
            js, Names(SCHEMA), f"s{subscribers}r", opts.rate, opts.duration
        )
        publisher_cpu = time.process_time() - publisher_cpu
        last = max(published.sent)
        end = ("last", last, opts.drain, published.sent)
        await asyncio.gather(*(asyncio.to_thread(p.send, end) for p in pipes))
        await asyncio.gather(*(asyncio.to_thread(p.recv) for p in pipes))
        gateway_cpu = cpu_seconds(gateway_pid) - gateway_cpu
        machine_cpu = machine_busy_seconds() - machine_cpu
        tallies = await asyncio.gather(*(asyncio.to_thread(p.recv) for p in pipes))
    finally:
        for process in children:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
    cpu = {"gateway": gateway_cpu, "publisher": publisher_cpu, "machine": machine_cpu}
    return {**_summarize(subscribers, published, readies, tallies, cpu), "load_avg_1m": load}


def _summarize(
    subscribers: int,
    published: Published,
    readies: list[Any],
    tallies: list[dict[str, Any]],
    cpu: dict[str, float],
) -> dict[str, Any]:
    latencies = array("d")
    for tally in tallies:
        latencies.frombytes(tally["latencies_ms"])
    ordered = sorted(latencies)
    first = min(published.sent.values())
    last_receive = max(t["last_receive"] for t in tallies)
    span = last_receive - first if last_receive > first else math.nan
    received = sum(t["received"] for t in tallies)
    reasons: Counter[str] = Counter()
    for tally in tallies:
        reasons.update(tally["drop_reasons"])
    expected = len(published.sent) * subscribers
    per_delivery_us = 1e6 / received if received else math.nan
    return {
        "subscribers": subscribers,
        "events": len(published.sent),
        "publish_rate": rounded(published.rate, 1),
        "publish_late_max_ms": rounded(published.late_max_ms, 1),
        "connect_s": rounded(max(r[1] for r in readies), 2),
        # per subscriber: its events over the span from the first send to the last receive
        "events_per_s": rounded(received / subscribers / span, 1),
        "deliveries_per_s": rounded(received / span, 0),
        "delivered_ratio": rounded(received / expected, 4),
        "p50_ms": rounded(percentile(ordered, 50), 1),
        "p99_ms": rounded(percentile(ordered, 99), 1),
        "max_ms": rounded(ordered[-1] if ordered else math.nan, 1),
        "dropped": sum(t["dropped"] for t in tallies),
        "drop_reasons": dict(reasons),
        "incomplete": sum(t["incomplete"] for t in tallies),
        "duplicates": sum(t["duplicates"] for t in tallies),
        # in cores, over the span: near 1.0 is a saturated process; "machine" is every
        # process's, ours and others' (the servers, other work on a shared machine)
        "gateway_cpu_cores": rounded(cpu["gateway"] / span, 2),
        "clients_cpu_cores": rounded(sum(t["cpu_s"] for t in tallies) / span, 2),
        "publisher_cpu_cores": rounded(cpu["publisher"] / span, 2),
        "machine_cpu_cores": rounded(cpu["machine"] / span, 2),
        # what one delivery costs, which contention changes less than the rates above
        "gateway_cpu_us_per_delivery": rounded(cpu["gateway"] * per_delivery_us, 1),
        "clients_cpu_us_per_delivery": rounded(
            sum(t["cpu_s"] for t in tallies) * per_delivery_us, 1
        ),
        "client_processes": len(tallies),
    }


# --- webhooks -----------------------------------------------------------------------------------


async def webhooks(
    root: Path, pg: PostgresServer, nats_server: NatsServer, weed: SeaweedFS, quick: bool
) -> dict[str, Any]:
    """``bench_webhooks``' figures on these servers, or nulls with a note saying why there
    are none."""
    empty: dict[str, Any] = {"webhooks_per_s": None, "backlog_drain_s": None}
    try:
        from tests.bench.bench_webhooks import webhook_figures
    except ImportError as exc:
        missing = exc.name == "tests.bench.bench_webhooks"
        why = "is not there yet" if missing else f"could not be imported ({exc})"
        return {**empty, "webhooks_note": f"tests/bench/bench_webhooks.py {why}"}
    settings = server_settings(root / "webhooks", pg, nats_server, weed, "bench-webhooks")
    try:  # --quick: as bench_webhooks' own
        figures = await (
            webhook_figures(settings, deliveries=2000, outage_s=5.0)
            if quick
            else webhook_figures(settings)
        )
    except Exception as exc:
        return {**empty, "webhooks_note": f"webhook_figures failed: {type(exc).__name__}: {exc}"}
    return {
        "webhooks_per_s": figures.get("webhooks_per_s"),
        "backlog_drain_s": figures.get("backlog_drain_s"),
        "webhooks": figures,
    }


# --- the run ------------------------------------------------------------------------------------


def _enough_descriptors(subscribers: int) -> None:
    """Room for every stream's socket, here and in the gateway (which inherits the limit)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = subscribers + 1024
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    _enough_descriptors(opts.subscribers)
    summary: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    try:
        pg = PostgresServer(root / "pg", port=0)
        nats_server = NatsServer(root / "nats", port=0)
        weed = SeaweedFS(root / "s3", S3Credentials.load_or_create(root / "s3" / "s3.json"), port=0)
        await asyncio.gather(pg.start(), nats_server.start(), weed.start())
        gateway = None
        try:
            gateway, key = await start_gateway(root, pg, nats_server, weed, SCHEMA)
            assert gateway.proc is not None
            nc = await nats.connect(nats_server.url)
            try:
                js = nc.jetstream()
                runs = {"baseline": 1, "fan_out": opts.subscribers}
                for label, count in runs.items():
                    figures = await fan_out(gateway.url, key, js, gateway.proc.pid, count, opts)
                    summary[label] = figures
                    _print_run(label, figures)
            finally:
                await nc.close()
            await gateway.stop()  # the webhooks' figures without it
            gateway = None
            if opts.skip_webhooks:
                summary["webhooks_note"] = "skipped (--skip-webhooks)"
            else:
                summary.update(await webhooks(root, pg, nats_server, weed, opts.quick))
        finally:
            if gateway is not None:
                await gateway.stop()
            for child in (weed, nats_server, pg):
                await child.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fan, base = summary["fan_out"], summary["baseline"]
    summary.update(
        {
            "sse_subscribers": fan["subscribers"],
            "sse_rate_asked": opts.rate,
            "sse_duration_s": opts.duration,
            "sse_events_per_s": fan["events_per_s"],
            "sse_deliveries_per_s": fan["deliveries_per_s"],
            "sse_p50_ms": fan["p50_ms"],
            "sse_p99_ms": fan["p99_ms"],
            "sse_max_ms": fan["max_ms"],
            "sse_dropped": fan["dropped"],
            "sse_delivered_ratio": fan["delivered_ratio"],
            "sse_gateway_cpu_cores": fan["gateway_cpu_cores"],
            "sse_clients_cpu_cores": fan["clients_cpu_cores"],
            "sse_machine_cpu_cores": fan["machine_cpu_cores"],
            "sse_gateway_cpu_us_per_delivery": fan["gateway_cpu_us_per_delivery"],
            "baseline_events_per_s": base["events_per_s"],
            "baseline_p50_ms": base["p50_ms"],
            "baseline_p99_ms": base["p99_ms"],
        }
    )
    summary.setdefault("webhooks_per_s", None)
    summary.setdefault("backlog_drain_s", None)
    summary["goals"] = {**GOALS, "webhooks_per_s": WEBHOOK_GOAL_PER_S}
    summary["meets_goals"] = _meets_goals(summary, opts)
    summary["clients"] = (
        f"{fan['client_processes']} subscriber process(es), separate from the gateway's and "
        "the publisher's"
    )
    summary["machine"] = {"cpu_count": os.cpu_count(), "load_avg_1m": load_average()}
    summary["elapsed_s"] = rounded(time.perf_counter() - started, 1)
    _print_summary(summary)
    return summary


def _meets_goals(summary: dict[str, Any], opts: argparse.Namespace) -> dict[str, bool | None]:
    p99, drops = summary["sse_p99_ms"], summary["sse_dropped"]
    sse = (
        summary["sse_subscribers"] >= GOALS["sse_subscribers"]
        and opts.rate >= GOALS["sse_events_per_s"]
        and (summary["sse_events_per_s"] or 0) >= 0.95 * opts.rate
        and p99 is not None
        and p99 <= GOALS["sse_p99_ms"]
        and drops == 0
    )
    rate = summary["webhooks_per_s"]
    return {"sse": sse, "webhooks": None if rate is None else rate >= WEBHOOK_GOAL_PER_S}


def _print_run(label: str, run: dict[str, Any]) -> None:
    print(
        f"{label}: {run['subscribers']} subscriber(s), {run['events']} events published at "
        f"{shown(run['publish_rate'])}/s (latest send {shown(run['publish_late_max_ms'])} ms "
        f"behind schedule); each subscriber got {shown(run['events_per_s'])} events/s "
        f"({shown(run['deliveries_per_s'])} deliveries/s in all, "
        f"{shown(run['delivered_ratio'])} of them); latency p50/p99/max "
        f"{shown(run['p50_ms'])}/{shown(run['p99_ms'])}/{shown(run['max_ms'])} ms; "
        f"dropped {run['dropped']} {run['drop_reasons'] or ''}, incomplete {run['incomplete']}, "
        f"duplicates {run['duplicates']}; CPU (cores): gateway "
        f"{shown(run['gateway_cpu_cores'])}, clients {shown(run['clients_cpu_cores'])} in "
        f"{run['client_processes']} process(es), publisher {shown(run['publisher_cpu_cores'])}, "
        f"whole machine {shown(run['machine_cpu_cores'])} of {os.cpu_count()}; CPU per "
        f"delivery: gateway {shown(run['gateway_cpu_us_per_delivery'])} us, clients "
        f"{shown(run['clients_cpu_us_per_delivery'])} us; load average "
        f"{shown(run['load_avg_1m'])} at the start; "
        f"all streams open in {shown(run['connect_s'])} s",
        file=sys.stderr,
    )


def _print_summary(summary: dict[str, Any]) -> None:
    print(
        f"webhooks: {shown(summary['webhooks_per_s'], '/s')}, backlog drained in "
        f"{shown(summary['backlog_drain_s'], ' s')}"
        + (f" ({summary['webhooks_note']})" if "webhooks_note" in summary else "")
        + f"; goals met: {summary['meets_goals']}; load average "
        f"{shown(summary['machine']['load_avg_1m'])}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="events published a second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing")
    parser.add_argument(
        "--drain", type=float, default=30.0, help="the longest wait for the last event"
    )
    parser.add_argument(
        "--client-procs", type=int, default=1, help="processes the subscribers are spread over"
    )
    parser.add_argument("--skip-webhooks", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.subscribers, opts.duration = min(opts.subscribers, 200), min(opts.duration, 5.0)
    if opts.subscribers < 1 or opts.rate <= 0 or opts.duration <= 0:
        parser.error("--subscribers, --rate and --duration must be positive")
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
