"""Chaos: the real stack under faults, counting what was lost, duplicated and delayed.

Run with ``python -m tests.bench.bench_chaos [--scenario worker-kill,nats-kill,s3-stall,
pg-restart,cluster-leader-kill] [--uploads 200] [--rate 4] [--inflight 8] [--workers 2]
[--logs DIR]`` (or ``make chaos ARGS=...``). It is not part of the test suite.

Each scenario gets a stack of its own, in a temporary directory: nats-server (or, for
``cluster-leader-kill``, three of them in a JetStream cluster on loopback, with R3 streams
and every client given all three URLs), SeaweedFS and PostgreSQL as child processes of
this one, then a real ``darkroom gateway`` and ``--workers`` ``darkroom worker`` processes
for each of ingest, caption and notify, configured by ``DARKROOM_*`` variables. A baseline
without faults always runs first, on the same kind of stack, for comparison.

After two warm-up uploads have become ready, ``--uploads`` distinct small JPEGs (random
pixels, so deduplication cannot hide a loss) go to ``POST /api/uploads`` at ``--rate`` per
second with at most ``--inflight`` in flight. The client acts like a real one: a 5xx (503
with Retry-After is expected while a dependency is down), 429 or broken connection is
retried with the same bytes (after Retry-After, else a back-off) for up to
``RETRY_FOR_S``; a retry that finds the first attempt accepted gets its id back. The faults
are injected while uploads are being issued:

* ``worker-kill``: at 1/4, 2/4 and 3/4 of the uploads, as soon as the function (ingest,
  then caption, then notify) has deliveries in flight, SIGKILL all its workers, and start
  as many replacements, as a supervisor would. Their deliveries come back after ack_wait;
* ``nats-kill``: at 1/3 and 2/3, SIGKILL nats-server, and start it again ``NATS_DOWN_S``
  later on the same port and store;
* ``s3-stall``: at 1/3, SIGSTOP SeaweedFS for ``S3_STALL_S`` (it hangs, accepting
  connections and answering nothing), then SIGCONT;
* ``pg-restart``: at 1/3, stop PostgreSQL (fast shutdown), start it ``PG_DOWN_S`` later;
* ``cluster-leader-kill``: at 1/2, SIGKILL the cluster member leading the event stream; it
  stays down, and the gateway and workers must carry on with the other two.

An image is ready when its read-model row (PostgreSQL, polled every ``POLL_S``) says
``ready``. After the last upload and fault, the run settles until every accepted image is
ready, or until every function's consumer (and its consumer of max-deliveries advisories)
has nothing pending and nothing un-acked, so nothing more can happen, with the sum of the
chain's longest redelivery paths as the outer bound. Reported per scenario:

* ``accepted``, ``ready``, ``lost`` (accepted, not ready once settled; ``lost_status`` says
  where they stopped: uploaded, ingested, failed or missing);
* ``duplicated``: ``duplicated_events`` ((type, image) pairs stored more than once in the
  event stream, read to its end) plus ``objects_rewritten`` (objects whose ETag changed
  between listings of the bucket every ``LIST_S``, or differs from the ETag an event
  announced for it: rewritten with different bytes);
* ``dead_letters`` (messages in the DLQ stream), ``client_5xx``, ``client_retries``,
  connection errors and give-ups;
* ``ready_p50_s``/``ready_p95_s``/``ready_max_s``: from the client's accept (the 2xx
  answer) to the image observed ready; ``accept_p95_s``: from the first attempt to the 2xx;
* ``redeliveries`` per function (deliveries beyond one per matching event) and what each
  fault did and when (``faults``).

Progress goes to stderr; the last line on stdout is one JSON object with every scenario,
the targets (0 lost and 0 duplicated everywhere, worker-kill p95 <= 20 s) and whether they
were met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import urllib3
from minio import Minio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from PIL import Image

from bus.core.envelope import EnvelopeError, Event, decode
from bus.core.subjects import Names
from bus.infra.nats_auth import Role
from bus.ops.embedded import S3Credentials, SeaweedFS
from bus.ops.pgserver import PostgresServer
from bus.runtime.registry import load
from bus.state.keys import create_key
from tests.bench.report import load_average, percentile, rounded, run_and_report, shown
from tests.support import procs
from tests.support.cluster import NatsNodes
from tests.support.streams import read_subject

CHAIN = ("ingest", "caption", "notify")
BASELINE = "baseline"
CLUSTER = "cluster-leader-kill"
SCENARIOS = ("worker-kill", "nats-kill", "s3-stall", "pg-restart", CLUSTER)
NAMESPACE = "chaos"
BUCKET = "chaos"
WARMUP = 2
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
WARMUP_TIMEOUT_S = 60.0
NATS_DOWN_S = 2.0
S3_STALL_S = 20.0
PG_DOWN_S = 5.0
ELECTION_TIMEOUT_S = 30.0
BUSY_WAIT_S = 10.0
POLL_S = 0.25
LIST_S = 1.0
REPORT_S = 10.0
REQUEST_TIMEOUT_S = 90.0
RETRY_FOR_S = 300.0
TARGET_WORKER_KILL_P95_S = 20.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def unique_jpeg() -> bytes:
    """A 256x256 JPEG of upscaled random pixels: small, cheap, and never a duplicate."""
    img = Image.frombytes("RGB", (16, 16), os.urandom(16 * 16 * 3))
    out = io.BytesIO()
    img.resize((256, 256), Image.Resampling.BILINEAR).save(out, "JPEG", quality=85)
    return out.getvalue()


# --- the stack ---------------------------------------------------------------------------------
class Stack:
    """Servers, gateway and workers of one scenario, all under ``root``."""

    def __init__(self, root: Path, nats_nodes: int, workers: int) -> None:
        self.root = root
        self.nats = NatsNodes(root, NAMESPACE, nats_nodes)
        self.s3 = SeaweedFS(root / "s3", S3Credentials.load_or_create(root / "s3.json"), port=0)
        self.pg = PostgresServer(root / "pg", port=0)
        self.names = Names(NAMESPACE)
        self.per_function = workers
        self.workers: dict[str, list[procs.Proc]] = {fn: [] for fn in CHAIN}
        self.retired: list[tuple[str, procs.Proc]] = []  # killed workers, kept for their logs
        self.gateway: procs.Proc | None = None
        self.kills = 0
        self.url = ""
        self.key = ""
        self.env: dict[str, str] = {}
        self._js: JetStreamContext | None = None
        self._nc: NATS | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "the stack has not started"
        return self._js

    @property
    def quick_js(self) -> JetStreamContext:
        """For polling during a fault: a request to a dead server must not hold us long."""
        assert self._nc is not None, "the stack has not started"
        return self._nc.jetstream(timeout=1.0)

    async def start(self) -> None:
        await asyncio.gather(self.nats.start(), self.s3.start(), self.pg.start())
        self.env = self._environment()
        self._nc = await self.nats.connect("chaos-bench")
        self._js = self._nc.jetstream(timeout=10.0)
        self.gateway = await procs.start(
            ["gateway"],
            {**self.env, **self.nats.client_env(Role.GATEWAY), "DARKROOM_GATEWAY__PORT": "0"},
        )
        line = await self.gateway.wait_for_line("gateway listening on", START_TIMEOUT_S)
        match = re.search(r"(http://[\d.]+:\d+)", line)
        if match is None:
            raise RuntimeError(f"no URL in the gateway's line {line!r}")
        self.url = match.group(1)
        # The gateway declared the streams and buckets; a key minted now reaches its mirror.
        self.key, _ = await create_key(
            await self.js.key_value(self.names.keys_kv), "chaos", ("admin",)
        )
        await asyncio.gather(
            *(self.start_worker(fn) for fn in CHAIN for _ in range(self.per_function))
        )

    def _environment(self) -> dict[str, str]:
        config = self.root / "darkroom.toml"  # empty: no stray ./darkroom.toml applies
        config.write_text("")
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
        return {
            **inherited,
            "DARKROOM_CONFIG": str(config),
            "DARKROOM_NAMESPACE": NAMESPACE,
            "DARKROOM_DATA_DIR": str(self.root / "darkroom"),
            "DARKROOM_LOG_LEVEL": "info",
            "DARKROOM_STREAM__REPLICAS": "3" if self.nats.clustered else "1",
            "DARKROOM_S3__ENDPOINT": self.s3.url,
            "DARKROOM_S3__ACCESS_KEY": self.s3.credentials.access_key,
            "DARKROOM_S3__SECRET_KEY": self.s3.credentials.secret_key,
            "DARKROOM_S3__BUCKET": BUCKET,
            "DARKROOM_POSTGRES__URL": self.pg.url,
        }

    async def start_worker(self, function: str) -> procs.Proc:
        # Each worker connects with the worker role, as deploy/ runs it.
        proc = await procs.start(
            ["worker", function], {**self.env, **self.nats.client_env(Role.WORKER)}
        )
        self.workers[function].append(proc)
        await proc.wait_for_line(f"worker {function} started", START_TIMEOUT_S)
        return proc

    async def kill_workers(self, function: str) -> dict[str, Any]:
        """SIGKILL every worker of ``function`` once it has deliveries in flight (the
        consumer does not say which worker holds them, so only killing them all is sure to
        orphan them), then start as many replacements and wait for them."""
        in_flight = await self.wait_busy(function)
        victims, self.workers[function] = self.workers[function], []
        at = time.monotonic()
        for victim in victims:
            victim.signal(signal.SIGKILL)
        for victim in victims:
            await victim.wait(STOP_TIMEOUT_S)
            self.retired.append((function, victim))
        self.kills += len(victims)
        started = time.monotonic()
        await asyncio.gather(*(self.start_worker(function) for _ in victims))
        return {
            "at": at,
            "function": function,
            "pids": [v.proc.pid for v in victims],
            "consumer_in_flight": in_flight,
            "replacements_ready_s": round(time.monotonic() - started, 2),
        }

    async def wait_busy(self, function: str) -> int | None:
        """The function's deliveries in flight, once there are some (or after BUSY_WAIT_S)."""
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            in_flight = await self.in_flight(function)
            if in_flight or time.monotonic() > deadline:
                return in_flight
            await asyncio.sleep(0.01)

    async def in_flight(self, function: str) -> int | None:
        """Delivered and not yet acked on the function's consumer (all its workers)."""
        with contextlib.suppress(Exception):
            info = await self.js.consumer_info(self.names.stream, self.names.durable(function))
            return int(info.num_ack_pending)
        return None

    async def settled(self) -> bool:
        """Every function's consumer, in chain order, has nothing pending and nothing
        un-acked, nor has its consumer of max-deliveries advisories: nothing more comes."""
        try:
            for fn in CHAIN:
                for stream, durable in (
                    (self.names.stream, self.names.durable(fn)),
                    (self.names.advisory_stream, self.names.exhausted_durable(fn)),
                ):
                    info = await self.js.consumer_info(stream, durable)
                    if info.num_pending or info.num_ack_pending:
                        return False
        except Exception:
            return False  # NATS is not answering: nothing is known
        return True

    def processes(self) -> list[tuple[str, procs.Proc]]:
        found = [("gateway", self.gateway)] if self.gateway is not None else []
        for fn, workers in self.workers.items():
            found += [(fn, p) for p in workers]
        return found + self.retired

    async def stop(self, logs: Path | None) -> None:
        """Darkroom's processes first (they drain against live servers), then the servers."""
        self.s3_resume()
        running = [p for _, p in self.processes() if p.proc.returncode is None]
        for p in running:
            p.signal(signal.SIGTERM)
        await asyncio.gather(*(_stop(p) for p in running))
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        await self.pg.stop()
        await self.s3.stop()
        await self.nats.stop()
        if logs is not None:
            self.save_logs(logs)

    def save_logs(self, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        for n, (name, p) in enumerate(self.processes()):
            (logs / f"{n:02d}-{name}-{p.proc.pid}.log").write_text(p.output + "\n")
        for path in [*self.nats.log_paths(), self.s3.log_path, self.pg.log_path]:
            if path.exists():
                shutil.copy(path, logs / path.name)

    def s3_pause(self) -> None:
        self._s3_signal(signal.SIGSTOP)

    def s3_resume(self) -> None:
        self._s3_signal(signal.SIGCONT)

    def _s3_signal(self, sig: signal.Signals) -> None:
        proc = self.s3.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # its own session: the whole group

    def tails(self, lines: int = 15) -> str:
        out = []
        for name, p in self.processes():
            out.append(f"--- {name} (pid {p.proc.pid}, exit {p.proc.returncode})")
            out += p.lines[-lines:]
        return "\n".join(out)


async def _stop(p: procs.Proc) -> None:
    try:
        await p.wait(STOP_TIMEOUT_S)
    except TimeoutError:
        p.signal(signal.SIGKILL)
        await p.wait(10)


# --- the client --------------------------------------------------------------------------------
@dataclass
class Upload:
    index: int
    t_sent: float
    t_accepted: float = math.nan
    image_id: str = ""
    attempts: int = 0


@dataclass
class ClientCounts:
    status_5xx: int = 0
    status_4xx: int = 0
    connection_errors: int = 0
    retries: int = 0
    gave_up: int = 0
    answered: int = 0  # uploads that got a final answer (accepted, refused or given up)
    duplicate_answers: int = 0
    retry_after_given: int = 0  # 5xx/429 answers that said when to come back
    statuses: Counter[int] = field(default_factory=Counter)


def _retry_after(headers: Any) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        return min(float(headers.get("Retry-After")), 10.0)
    return None


async def send(
    http: aiohttp.ClientSession, url: str, data: bytes, index: int, counts: ClientCounts
) -> Upload:
    """POST one image, retrying as a real client would; ``image_id`` is empty if refused."""
    up = Upload(index, time.monotonic())
    deadline = up.t_sent + RETRY_FOR_S
    backoff = 0.5
    while True:
        up.attempts += 1
        form = aiohttp.FormData()
        form.add_field("file", data, filename=f"chaos-{index}.jpg", content_type="image/jpeg")
        wait: float | None = None
        try:
            async with http.post(f"{url}/api/uploads", data=form) as resp:
                body = await resp.read()
                counts.statuses[resp.status] += 1
                if resp.status in (200, 201):
                    [result] = orjson.loads(body)["results"]
                    up.image_id, up.t_accepted = result["id"], time.monotonic()
                    counts.duplicate_answers += bool(result["duplicate"])
                    return up
                if resp.status < 500 and resp.status != 429:
                    counts.status_4xx += 1
                    say(f"    upload {index} refused: {resp.status} {body[:200]!r}")
                    return up
                counts.status_5xx += resp.status >= 500
                wait = _retry_after(resp.headers)
                counts.retry_after_given += wait is not None
        except (aiohttp.ClientError, TimeoutError):
            counts.connection_errors += 1
        pause = wait if wait is not None else backoff
        if time.monotonic() + pause > deadline:
            counts.gave_up += 1
            return up
        counts.retries += 1
        await asyncio.sleep(pause)
        backoff = min(backoff * 2, 5.0)


async def wait_authorised(http: aiohttp.ClientSession, url: str) -> None:
    """Until the gateway knows the freshly minted key (its mirror of the key bucket)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        async with http.get(f"{url}/api/openapi.json") as resp:
            if resp.status == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway still answers {resp.status} to the admin key")
        await asyncio.sleep(0.1)


# --- observers ---------------------------------------------------------------------------------
class ReadyWatcher:
    """Polls the read model for the accepted images that are not ready yet."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.query = f'SELECT id, status FROM "{schema}".images WHERE id = ANY($1::text[])'
        self.accepted: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self.errors = 0
        self.last_error = ""
        self._polled = asyncio.Event()
        self._conn: Any = None

    def watch(self, image_id: str, t_accepted: float) -> None:
        self.accepted.setdefault(image_id, t_accepted)

    def all_ready(self, ids: list[str] | None = None) -> bool:
        return all(i in self.ready_at for i in (self.accepted if ids is None else ids))

    async def _fetch(self, ids: list[str]) -> dict[str, str]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.url, timeout=3.0)
        rows = await self._conn.fetch(self.query, ids, timeout=5.0)
        return {r["id"]: r["status"] for r in rows}

    async def run(self) -> None:
        while True:
            waiting = [i for i in self.accepted if i not in self.ready_at]
            try:
                if waiting:
                    statuses = await self._fetch(waiting)
                    now = time.monotonic()
                    for image_id, status in statuses.items():
                        if status == "ready":
                            self.ready_at[image_id] = now
                self._polled.set()
            except Exception as exc:  # the database is down or restarting: keep asking
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                await self.close()
            await asyncio.sleep(POLL_S)

    async def next_poll(self) -> None:
        """Until a poll that started after this call has completed."""
        for _ in range(2):  # the one under way may have started before
            self._polled.clear()
            with contextlib.suppress(TimeoutError):  # the database is down: lost is lost
                await asyncio.wait_for(self._polled.wait(), STOP_TIMEOUT_S)

    async def wait_ready(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.all_ready(ids):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def statuses(self, ids: list[str]) -> dict[str, str]:
        """Where each of ``ids`` stands now (call once the polling task has stopped)."""
        for _ in range(20):
            try:
                return await self._fetch(ids)
            except Exception:
                await self.close()
                await asyncio.sleep(0.5)
        raise RuntimeError("the read model cannot be read")

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2.0)
            self._conn = None


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


class ObjectWatcher:
    """Lists the bucket every ``LIST_S`` and keeps each object's ETags as they change."""

    def __init__(self, s3: SeaweedFS, bucket: str) -> None:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=10.0), retries=urllib3.Retry(total=0)
        )
        self.client = Minio(
            s3.url.removeprefix("http://"),
            access_key=s3.credentials.access_key,
            secret_key=s3.credentials.secret_key,
            secure=False,
            region="us-east-1",
            http_client=http,
        )
        self.bucket = bucket
        self.etags: dict[str, str] = {}
        self.changed: dict[str, list[str]] = {}
        self.errors = 0

    def _listing(self) -> dict[str, str]:
        return {
            o.object_name: _etag(o.etag)
            for o in self.client.list_objects(self.bucket, recursive=True)
            if o.object_name
        }

    async def scan(self) -> None:
        for key, etag in (await asyncio.to_thread(self._listing)).items():
            before = self.etags.get(key)
            if before is not None and before != etag:
                self.changed.setdefault(key, [before]).append(etag)
            self.etags[key] = etag

    async def run(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:
                self.errors += 1
            await asyncio.sleep(LIST_S)


# --- faults ------------------------------------------------------------------------------------
class Progress:
    """How many uploads have been issued, for faults timed by it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.issued = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.issued += 1
        self._changed.set()

    async def reached(self, fraction: float) -> None:
        target = max(1, math.ceil(fraction * self.total))
        while self.issued < target:
            self._changed.clear()
            await self._changed.wait()


@dataclass
class Run:
    """What a fault plan acts on, and where it notes what it did."""

    stack: Stack
    progress: Progress
    t0: float
    faults: list[dict[str, Any]] = field(default_factory=list)

    def note(self, what: str, started: float, **details: Any) -> None:
        """Record a fault that began at ``started`` (monotonic)."""
        entry = {"what": what, "at_s": round(started - self.t0, 2), **details}
        self.faults.append(entry)
        say(f"    {entry}")


async def no_faults(run: Run) -> None:
    return None


async def kill_workers(run: Run) -> None:
    for n, fraction in enumerate((0.25, 0.5, 0.75)):
        await run.progress.reached(fraction)
        function = CHAIN[n % len(CHAIN)]
        killed = await run.stack.kill_workers(function)
        run.note("SIGKILL workers", killed.pop("at"), **killed)


async def kill_nats(run: Run) -> None:
    nats = run.stack.nats
    [name] = nats.members
    for fraction in (1 / 3, 2 / 3):
        await run.progress.reached(fraction)
        started = time.monotonic()
        await nats.kill(name)
        await asyncio.sleep(NATS_DOWN_S)
        await nats.restart(name)
        run.note(
            "SIGKILL nats-server, restarted", started, down_s=round(time.monotonic() - started, 2)
        )


async def stall_s3(run: Run) -> None:
    await run.progress.reached(1 / 3)
    started = time.monotonic()
    run.stack.s3_pause()
    try:
        await asyncio.sleep(S3_STALL_S)
    finally:
        run.stack.s3_resume()
    run.note("SIGSTOP SeaweedFS, SIGCONT", started, stalled_s=round(time.monotonic() - started, 2))


async def restart_pg(run: Run) -> None:
    await run.progress.reached(1 / 3)
    started = time.monotonic()
    await run.stack.pg.stop()
    await asyncio.sleep(PG_DOWN_S)
    await run.stack.pg.start()
    run.note(
        "PostgreSQL stopped (fast), started", started, down_s=round(time.monotonic() - started, 2)
    )


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
    with contextlib.suppress(Exception):
        info = await js.stream_info(stream)
        return info.cluster.leader if info.cluster is not None else None
    return None


async def kill_stream_leader(run: Run) -> None:
    stack = run.stack
    await run.progress.reached(0.5)
    leader = await stream_leader(stack.quick_js, stack.names.stream)
    if leader is None:
        raise RuntimeError("the event stream reports no leader")
    started = time.monotonic()
    await stack.nats.kill(leader)
    new_leader = None
    while time.monotonic() - started < ELECTION_TIMEOUT_S:
        new_leader = await stream_leader(stack.quick_js, stack.names.stream)
        if new_leader not in (None, leader):
            break
        await asyncio.sleep(0.1)
    run.note(
        "SIGKILL the event stream's leader",
        started,
        leader=leader,
        new_leader=new_leader,
        election_s=round(time.monotonic() - started, 2),
    )


FAULTS: dict[str, Callable[[Run], Coroutine[Any, Any, None]]] = {
    BASELINE: no_faults,
    "worker-kill": kill_workers,
    "nats-kill": kill_nats,
    "s3-stall": stall_s3,
    "pg-restart": restart_pg,
    CLUSTER: kill_stream_leader,
}


# --- one scenario --------------------------------------------------------------------------------
@dataclass
class Options:
    uploads: int
    rate: float
    inflight: int
    workers: int
    scenarios: tuple[str, ...]
    logs: Path | None


def settle_bound_s() -> float:
    """The longest the chain can take to redeliver its way through: the outer bound."""
    return sum(load(fn).spec.longest_redelivery_gap for fn in CHAIN)


async def issue(
    http: aiohttp.ClientSession,
    url: str,
    images: list[bytes],
    opts: Options,
    progress: Progress,
    watcher: ReadyWatcher,
    counts: ClientCounts,
) -> list[Upload]:
    """``images`` at ``opts.rate`` per second, at most ``opts.inflight`` at once."""
    slots = asyncio.Semaphore(opts.inflight)

    async def one(index: int, data: bytes) -> Upload:
        async with slots:
            up = await send(http, url, data, index, counts)
        counts.answered += 1
        if up.image_id:
            watcher.watch(up.image_id, up.t_accepted)
        return up

    start = time.monotonic()
    tasks = []
    for index, data in enumerate(images):
        delay = start + index / opts.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        progress.bump()
        tasks.append(asyncio.create_task(one(index, data)))
    return list(await asyncio.gather(*tasks))


async def report(run: Run, counts: ClientCounts, watcher: ReadyWatcher) -> None:
    """A line every ``REPORT_S`` on stderr: where the run is, should it hang."""
    while True:
        await asyncio.sleep(REPORT_S)
        in_flight = {fn: await run.stack.in_flight(fn) for fn in CHAIN}
        say(
            f"    at {time.monotonic() - run.t0:.0f} s: issued {run.progress.issued}, answered "
            f"{counts.answered}, accepted {len(watcher.accepted)}, ready {len(watcher.ready_at)} "
            f"(warm-up included), in flight {in_flight}, read-model errors {watcher.errors}"
            + (f" (last: {watcher.last_error})" if watcher.last_error else "")
        )


async def settle(stack: Stack, watcher: ReadyWatcher) -> str:
    """Until every accepted image is ready, or nothing more can happen (see the docstring)."""
    deadline = time.monotonic() + settle_bound_s()
    while time.monotonic() < deadline:
        if watcher.all_ready():
            return "all ready"
        if await stack.settled():
            await watcher.next_poll()
            return "all ready" if watcher.all_ready() else "consumers settled"
        await asyncio.sleep(0.5)
    return "outer bound"


async def drive(stack: Stack, scenario: str, opts: Options) -> dict[str, Any]:
    images = [unique_jpeg() for _ in range(WARMUP + opts.uploads)]
    watcher = ReadyWatcher(stack.pg.url, NAMESPACE)
    objects = ObjectWatcher(stack.s3, BUCKET)
    headers = {"Authorization": f"Bearer {stack.key}"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        await wait_authorised(http, stack.url)
        watching = [asyncio.create_task(watcher.run()), asyncio.create_task(objects.run())]
        faults: asyncio.Task[None] | None = None
        try:
            warm = [
                await send(http, stack.url, data, -1 - i, ClientCounts())
                for i, data in enumerate(images[:WARMUP])
            ]
            for up in warm:
                if not up.image_id:
                    raise RuntimeError("a warm-up upload was refused")
                watcher.watch(up.image_id, up.t_accepted)
            if not await watcher.wait_ready([u.image_id for u in warm], WARMUP_TIMEOUT_S):
                raise RuntimeError(f"the warm-up uploads were not ready in {WARMUP_TIMEOUT_S} s")
            warm_ids = {u.image_id for u in warm}
            counts = ClientCounts()
            run = Run(stack, Progress(opts.uploads), time.monotonic())
            faults = asyncio.create_task(FAULTS[scenario](run))
            watching.append(asyncio.create_task(report(run, counts, watcher)))
            uploads = await issue(
                http, stack.url, images[WARMUP:], opts, run.progress, watcher, counts
            )
            uploads_done_s = time.monotonic() - run.t0
            await faults
            settle_started = time.monotonic()
            settled_by = await settle(stack, watcher)
            settle_s = time.monotonic() - settle_started
        finally:
            if faults is not None and not faults.done():
                watching.append(faults)  # the run failed part-way: stop injecting too
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)
    accepted = [u for u in uploads if u.image_id]
    ids = [u.image_id for u in accepted]
    statuses = await watcher.statuses(ids)
    await watcher.close()
    await objects.scan()  # the final state, with every fault over
    events, undecodable = await stored_events(stack)
    result = {
        "scenario": scenario,
        **tally(watcher, accepted, statuses, warm_ids),
        **duplicates(events, objects),
        "undecodable_events": undecodable,
        "dead_letters": await dead_letters(stack),
        "client_5xx": counts.status_5xx,
        "client_4xx": counts.status_4xx,
        "client_connection_errors": counts.connection_errors,
        "client_retries": counts.retries,
        "client_gave_up": counts.gave_up,
        "client_duplicate_answers": counts.duplicate_answers,
        "client_retry_after_given": counts.retry_after_given,
        "client_statuses": {str(k): v for k, v in sorted(counts.statuses.items())},
        "accept_p95_s": rounded(percentile([u.t_accepted - u.t_sent for u in accepted], 95)),
        "redeliveries": await redeliveries(stack, events),
        "worker_kills": stack.kills,
        "faults": run.faults,
        "uploads_done_s": round(uploads_done_s, 1),
        "settled_by": settled_by,
        "settle_s": round(settle_s, 1),
        "read_model_poll_errors": watcher.errors,
        "bucket_listing_errors": objects.errors,
    }
    return result


def tally(
    watcher: ReadyWatcher, accepted: list[Upload], statuses: dict[str, str], warm: set[str]
) -> dict[str, Any]:
    ready = [u for u in accepted if u.image_id in watcher.ready_at]
    lost = [u.image_id for u in accepted if u.image_id not in watcher.ready_at]
    latencies = [watcher.ready_at[u.image_id] - u.t_accepted for u in ready]
    return {
        "accepted": len(accepted),
        "ready": len(ready),
        "lost": len(lost),
        "lost_status": dict(Counter(statuses.get(i, "missing") for i in lost)),
        "lost_examples": lost[:5],
        "ready_p50_s": rounded(percentile(latencies, 50)),
        "ready_p95_s": rounded(percentile(latencies, 95)),
        "ready_max_s": rounded(max(latencies, default=math.nan)),
        "warmup_ready": all(i in watcher.ready_at for i in warm),
    }


async def stored_events(stack: Stack) -> tuple[list[Event], int]:
    """Every event in the stream, read to its end."""
    msgs = await read_subject(stack.js, stack.names.all_events, timeout=120.0)
    events, bad = [], 0
    for msg in msgs:
        try:
            events.append(decode(msg.data))
        except EnvelopeError:
            bad += 1
    return events, bad


def duplicates(events: list[Event], objects: ObjectWatcher) -> dict[str, Any]:
    per = Counter((e.type, e.image_id) for e in events if e.image_id)
    twice = {f"{t} {i}": n for (t, i), n in per.items() if n > 1}
    # An object an event announced must still hold the bytes the event saw.
    mismatched = {
        e.object.key
        for e in events
        if e.object is not None
        and e.object.etag
        and e.object.key in objects.etags
        and _etag(e.object.etag) != objects.etags[e.object.key]
    }
    rewritten = set(objects.changed) | mismatched
    return {
        "duplicated": len(twice) + len(rewritten),
        "duplicated_events": len(twice),
        "duplicated_event_examples": dict(list(twice.items())[:5]),
        "objects_rewritten": len(rewritten),
        "objects_rewritten_examples": sorted(rewritten)[:5],
        "events_by_type": dict(Counter(e.type for e in events)),
    }


async def dead_letters(stack: Stack) -> int:
    info = await stack.js.stream_info(stack.names.dlq_stream)
    return int(info.state.messages)


async def redeliveries(stack: Stack, events: list[Event]) -> dict[str, int | None]:
    """Deliveries each function's consumer made beyond one per event it listens to."""
    out: dict[str, int | None] = {}
    for fn in CHAIN:
        listens = load(fn).spec.listens
        matching = sum(1 for e in events if any(_matches(e.type, t) for t in listens))
        try:
            info = await stack.js.consumer_info(stack.names.stream, stack.names.durable(fn))
            out[fn] = int(info.delivered.consumer_seq or 0) - matching
        except Exception:
            out[fn] = None
    return out


def _matches(topic: str, pattern: str) -> bool:
    """Whether a NATS subject pattern of topics (``failed.>``) covers ``topic``."""
    if pattern.endswith(".>"):
        return topic.startswith(pattern[:-1])
    return topic == pattern


async def run_scenario(scenario: str, opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    nodes = 3 if scenario == CLUSTER else 1
    logs = opts.logs / scenario if opts.logs is not None else None
    with tempfile.TemporaryDirectory(prefix=f"chaos-{scenario}-") as tmp:
        stack = Stack(Path(tmp), nodes, opts.workers)
        try:
            await stack.start()
            say(f"  stack up: gateway {stack.url}, NATS {stack.nats.url}")
            result = await drive(stack, scenario, opts)
        except Exception as exc:
            say(f"  {scenario} failed: {type(exc).__name__}: {exc}\n{stack.tails()}")
            result = {"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            await stack.stop(logs)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


# --- the benchmark -----------------------------------------------------------------------------
def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, and whether each scenario met them."""
    met: dict[str, bool] = {}
    for name, r in results.items():
        ok = "error" not in r and r["lost"] == 0 and r["duplicated"] == 0
        if name == "worker-kill":
            p95 = r.get("ready_p95_s")
            ok = ok and p95 is not None and p95 <= TARGET_WORKER_KILL_P95_S
        met[name] = ok
    return {
        "targets": {
            "lost": 0,
            "duplicated": 0,
            "worker_kill_ready_p95_s": TARGET_WORKER_KILL_P95_S,
        },
        "met": met,
        "all_met": all(met.values()),
    }


def line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['scenario']:<20} error: {r['error']}"
    return (
        f"{r['scenario']:<20} accepted {r['accepted']}, ready {r['ready']}, lost {r['lost']}, "
        f"duplicated {r['duplicated']} ({r['duplicated_events']} events, "
        f"{r['objects_rewritten']} objects), dead letters {r['dead_letters']}, "
        f"5xx {r['client_5xx']} (retries {r['client_retries']}), "
        f"ready p50 {shown(r['ready_p50_s'], ' s')} p95 {shown(r['ready_p95_s'], ' s')} "
        f"max {shown(r['ready_max_s'], ' s')}; settled by {r['settled_by']} "
        f"in {r['settle_s']} s"
    )


async def run(opts: Options) -> dict[str, Any]:
    started, load_before = time.monotonic(), load_average()
    results: dict[str, dict[str, Any]] = {}
    for scenario in (BASELINE, *opts.scenarios):
        say(f"{scenario}: {opts.uploads} uploads at {opts.rate:g}/s")
        results[scenario] = await run_scenario(scenario, opts)
        say(f"  {line(results[scenario])}")
    say("")
    for r in results.values():
        say(line(r))
    return {
        "scenarios": results,
        **targets(results),
        "uploads": opts.uploads,
        "rate": opts.rate,
        "inflight": opts.inflight,
        "workers_per_function": opts.workers,
        "ack_wait_s": {fn: load(fn).spec.ack_wait for fn in CHAIN},
        "faults": {
            "nats_down_s": NATS_DOWN_S,
            "s3_stall_s": S3_STALL_S,
            "pg_down_s": PG_DOWN_S,
        },
        "cpu_count": os.cpu_count(),
        "load_avg_1m": [load_before, load_average()],
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--scenario",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all; a baseline "
        "without faults always runs first)",
    )
    parser.add_argument("--uploads", type=int, default=200, help="measured uploads per scenario")
    parser.add_argument("--rate", type=float, default=4.0, help="uploads issued per second")
    parser.add_argument("--inflight", type=int, default=8, help="uploads in flight at most")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per function")
    parser.add_argument("--logs", type=Path, help="keep every process's log here, per scenario")
    args = parser.parse_args(argv)
    scenarios = tuple(s.strip() for s in args.scenario.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; expected {', '.join(SCENARIOS)}")
    if min(args.uploads, args.inflight, args.workers) < 1 or args.rate <= 0:
        parser.error("--uploads, --inflight and --workers must be >= 1, --rate > 0")
    if args.workers < 2 and "worker-kill" in scenarios:
        say("note: with --workers 1, a killed worker's function stops until its replacement")
    return Options(
        uploads=args.uploads,
        rate=args.rate,
        inflight=args.inflight,
        workers=args.workers,
        scenarios=tuple(dict.fromkeys(scenarios)),
        logs=args.logs,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
