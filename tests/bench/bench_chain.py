"""Throughput and latency of a 3-stage no-op chain: darkroom's runtime vs. hand-written nats-py.

Run with ``python -m tests.bench.bench_chain [--n 2000] [--pace 25] [--paced-n 250]
[--concurrency 256] [--rounds 2] [--quick]``.

Method
------
One invocation starts a real nats-server (JetStream, file storage) and a real SeaweedFS
(``open_context`` insists on S3, although the chain never touches it) in a temporary
directory, and stops both at the end. Everything else runs in this one process and one
event loop.

Both variants run the same chain shape, ``b0 -> s1 -> b1 -> s2 -> b2 -> s3 -> b3``, and are
fed by the same producer on a connection of its own. The producer builds a darkroom
envelope per chain whose ``data`` carries the chain index and ``t0 = time.perf_counter()``
taken just before ``publish_async`` (with ``Nats-Msg-Id`` = the event id). Publishes are
pipelined: all futures are awaited at the end, as a real producer would. Completion is
observed by a core NATS subscription (on the producer's connection) to the ``b3`` subject:
a chain's latency is the time from its ``t0`` to the moment ``b3`` reaches that
subscription; throughput is ``N / (last completion - first publish)``.

Two modes, each measured on a freshly started chain warmed up with a short burst:

* saturated: all N chains are published as fast as the producer can;
* paced: ``--paced-n`` chains at ``--pace`` chains/s on a fixed schedule (unloaded latency).

Variants run alternately (darkroom, baseline, darkroom, baseline, ...) for ``--rounds``
rounds to spread the noise of a small machine over both. Throughput is the best round of
each variant; saturated latencies come from that best round; paced percentiles pool the
samples of every round.

The darkroom variant
--------------------
``open_context`` with a fresh namespace and three :class:`FunctionRunner` (``--concurrency``
handler invocations per stage) whose handlers return ``[Emit(next_topic, data=event.data)]``.
The runner does what it does in production: decode and validate the envelope, derive the
output id, publish, wait for the PubAck, ack.

``--concurrency`` is each stage's window of events in flight, the counterpart of the
baseline's fetch size. For a no-op chain a wide window pays: 256 gave about 10% more than
64 in alternating runs here (1,570-1,710 against 1,260-1,570 chains/s); real functions
set theirs in their Spec or settings.

The baseline
------------
A competent minimal chain written directly against nats-py, on a stream of its own with the
same storage, duplicate window and consumer settings (durable, explicit ack, the same
ack_wait/max_deliver/max_ack_pending). Each stage is one task looping over

    msgs = await psub.fetch(batch, timeout=...)
    futures = [await js.publish_async(next_subject, msg.data, headers={Nats-Msg-Id: ...})]
    await asyncio.gather(*futures)
    for msg in msgs: await msg.ack()

It forwards the payload bytes unchanged (no decoding), with a message id derived from the
input's so that replays would dedupe, as darkroom's do.

How a stage calls ``fetch`` matters, and no single setting is best in both modes, so the
baseline gets the best measured setting for each (``BaselineFetch``; this machine, nats-py
2.16, nats-server 2.15, settings run alternately, 2-3 runs each):

* saturated: ``fetch(100, timeout=0.01)``; 1,400-1,500 chains/s, against 1,050-1,280 with
  a 0.05 s timeout, 1,125-1,370 with 0.1 s and 340-440 with ``fetch(1)``. A stage that has
  caught up with the one before it gets back to work sooner with a short timeout.
* paced: ``fetch(1, timeout=1.0)``, one lingering request that returns the moment its
  message arrives; p50 5.6 ms, against 7.2 ms with ``fetch(100, timeout=0.05)`` and
  8.7 ms with ``fetch(100, timeout=0.01)``, whose idle stages keep re-polling.

darkroom's continuous pull consumer has one setting for both modes.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from pydantic import SecretStr

from bus.core.contract import Emit, Spec
from bus.core.envelope import Event, new_id, now_iso
from bus.core.settings import NatsSettings, S3Settings, Settings
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.runtime.call import Call
from bus.runtime.context import Context, open_context
from bus.runtime.registry import Function
from bus.runtime.runner import FunctionRunner
from bus.runtime.streams import MAX_ACK_PENDING, duplicate_window
from tests.bench.report import percentile, rounded, run_and_report

TOPICS = ("b0", "b1", "b2", "b3")
STAGES = ("s1", "s2", "s3")
COMPLETION_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0

log = logging.getLogger("bench.chain")


# --- results ---------------------------------------------------------------------------------
@dataclass
class RunResult:
    variant: str
    mode: str
    n: int
    elapsed_s: float
    latencies_ms: list[float]

    @property
    def chains_per_s(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def line(self) -> str:
        return (
            f"  {self.variant:<9} {self.mode:<9} n={self.n:<5} {self.chains_per_s:8.1f} chains/s  "
            f"p50 {self.p(50):7.2f}  p95 {self.p(95):7.2f}  p99 {self.p(99):7.2f}  "
            f"max {max(self.latencies_ms, default=math.nan):7.2f} ms"
        )


# --- the chains --------------------------------------------------------------------------------
class Chain(Protocol):
    """A running 3-stage chain: publish on ``first_subject``, completion on ``last_subject``."""

    variant: str
    first_subject: str
    last_subject: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _forward(next_topic: str) -> Callable[[Event, Context, Call], Awaitable[list[Emit]]]:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        return [Emit(next_topic, data=event.data)]

    return handle


class DarkroomChain:
    """Three FunctionRunners in one context, under a namespace of their own."""

    variant = "darkroom"

    def __init__(self, servers: Servers, concurrency: int) -> None:
        self._settings = servers.settings(f"bench{uuid.uuid4().hex[:10]}")
        self._concurrency = concurrency
        self._functions = [
            Function(
                Spec(stage, listens=(TOPICS[i],), emits=(TOPICS[i + 1],), concurrency=concurrency),
                handle=_forward(TOPICS[i + 1]),
            )
            for i, stage in enumerate(STAGES)
        ]
        ns = self._settings.namespace
        self.first_subject = f"{ns}.{TOPICS[0]}"
        self.last_subject = f"{ns}.{TOPICS[-1]}"
        self._stack = contextlib.AsyncExitStack()
        self._runners: list[FunctionRunner] = []

    async def start(self) -> None:
        specs = [fn.spec for fn in self._functions]
        ctx = await self._stack.enter_async_context(open_context(self._settings, specs, "bench"))
        for fn in self._functions:
            runner = FunctionRunner(fn, ctx, self._concurrency)
            await runner.start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.drain(timeout=STOP_TIMEOUT_S)
        self._runners.clear()
        await self._stack.aclose()


@dataclass(frozen=True)
class BaselineFetch:
    """How each baseline stage calls ``fetch`` (see the module docstring)."""

    batch: int
    timeout: float


BASELINE_SATURATED = BaselineFetch(batch=100, timeout=0.01)
BASELINE_PACED = BaselineFetch(batch=1, timeout=1.0)


class BaselineChain:
    """The hand-written nats-py chain: one durable pull consumer and one loop per stage."""

    variant = "baseline"

    def __init__(self, servers: Servers, fetch: BaselineFetch) -> None:
        self._url = servers.nats.url
        self._fetch = fetch
        self._prefix = f"base{uuid.uuid4().hex[:10]}"
        self._stream = self._prefix.upper()
        self.first_subject = f"{self._prefix}.{TOPICS[0]}"
        self.last_subject = f"{self._prefix}.{TOPICS[-1]}"
        self._nc: NATS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        self._nc = await _connect(self._url, "bench-baseline")
        js = self._nc.jetstream(timeout=10.0)
        await js.add_stream(
            StreamConfig(
                name=self._stream,
                subjects=[f"{self._prefix}.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=duplicate_window([Spec("s", listens=("b",))]),
            )
        )
        for i, stage in enumerate(STAGES):
            durable = f"{self._prefix}_{stage}"
            await js.add_consumer(
                self._stream,
                ConsumerConfig(
                    name=durable,
                    durable_name=durable,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_deliver=5,
                    filter_subject=f"{self._prefix}.{TOPICS[i]}",
                    max_ack_pending=MAX_ACK_PENDING,
                ),
            )
            psub = await js.pull_subscribe_bind(durable, self._stream)
            next_subject = f"{self._prefix}.{TOPICS[i + 1]}"
            self._tasks.append(
                asyncio.create_task(self._stage(js, psub, stage, next_subject), name=stage)
            )

    async def _stage(
        self,
        js: JetStreamContext,
        psub: JetStreamContext.PullSubscription,
        stage: str,
        next_subject: str,
    ) -> None:
        batch, timeout = self._fetch.batch, self._fetch.timeout
        while not self._stopping:
            try:
                msgs = await psub.fetch(batch, timeout=timeout)
            except TimeoutError:  # nats.errors.TimeoutError or asyncio's: nothing came
                continue
            futures = []
            for msg in msgs:
                parent_id = msg.headers.get("Nats-Msg-Id", "") if msg.headers else ""
                futures.append(
                    await js.publish_async(
                        next_subject, msg.data, headers={"Nats-Msg-Id": f"{stage}-{parent_id}"}
                    )
                )
            await asyncio.gather(*futures)
            for msg in msgs:
                await msg.ack()

    async def stop(self) -> None:
        # Each loop notices the flag when its current fetch returns (within its timeout).
        self._stopping = True
        if self._tasks:
            limit = self._fetch.timeout + STOP_TIMEOUT_S
            _, pending = await asyncio.wait(self._tasks, timeout=limit)
            for task in pending:
                task.cancel()
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.warning("baseline stage failed: %r", result)
        self._tasks.clear()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.jetstream().delete_stream(self._stream)
            # Not drain(): nats-py's fetch() takes messages off a pull subscription's queue
            # without task_done(), so draining that subscription waits for ever. Every ack
            # went out with the flush.
            with contextlib.suppress(Exception):
                await self._nc.flush()
            await self._nc.close()
            self._nc = None


# --- producer and observer ---------------------------------------------------------------------
class Observer:
    """Records, per chain index, when its last event reached a core subscription."""

    def __init__(self, tag: str, n: int) -> None:
        self.tag = tag
        self.n = n
        self.latency_s: dict[int, float] = {}
        self.t0: dict[int, float] = {}
        self.last_done = 0.0
        self.complete = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        now = time.perf_counter()
        data = orjson.loads(msg.data).get("data") or {}
        if data.get("run") != self.tag:
            return
        index = int(data["i"])
        if index in self.latency_s:
            return  # a redelivery republished it; count each chain once
        t0 = float(data["t0"])
        self.latency_s[index] = now - t0
        self.t0[index] = t0
        self.last_done = max(self.last_done, now)
        if len(self.latency_s) >= self.n:
            self.complete.set()


async def produce(js: JetStreamContext, subject: str, tag: str, n: int, pace: float | None) -> None:
    """Publish ``n`` chain starts on ``subject``: back to back, or ``pace`` per second."""
    futures: list[asyncio.Future[Any]] = []
    start = time.perf_counter()
    for i in range(n):
        if pace:
            delay = start + i / pace - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        event_id = new_id()
        event = Event(
            id=event_id,
            type=TOPICS[0],
            source="bench/producer",
            time=now_iso(),
            image_id=event_id,
            data={"run": tag, "i": i, "t0": time.perf_counter()},
        )
        futures.append(
            await js.publish_async(subject, event.encode(), headers={"Nats-Msg-Id": event.id})
        )
    acks = await asyncio.gather(*futures)
    duplicates = sum(1 for ack in acks if ack.duplicate)
    if duplicates:
        raise RuntimeError(f"{duplicates} producer publishes were reported as duplicates")


@dataclass
class Client:
    """The producer's connection; it also carries the completion subscription."""

    nc: NATS
    js: JetStreamContext


async def drive(client: Client, chain: Chain, n: int, pace: float | None, mode: str) -> RunResult:
    """Publish ``n`` chains through ``chain`` and wait until every one completed."""
    tag = uuid.uuid4().hex[:8]
    observer = Observer(tag, n)
    sub = await client.nc.subscribe(chain.last_subject, cb=observer.on_msg)
    await client.nc.flush()
    try:
        await produce(client.js, chain.first_subject, tag, n, pace)
        try:
            await asyncio.wait_for(observer.complete.wait(), COMPLETION_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(
                f"{chain.variant} {mode}: only {len(observer.latency_s)} of {n} chains completed "
                f"within {COMPLETION_TIMEOUT_S:.0f} s"
            ) from None
    finally:
        await sub.unsubscribe()
    first = min(observer.t0.values())
    return RunResult(
        variant=chain.variant,
        mode=mode,
        n=n,
        elapsed_s=observer.last_done - first,
        latencies_ms=[v * 1000.0 for v in observer.latency_s.values()],
    )


# --- servers -------------------------------------------------------------------------------------
@dataclass
class Servers:
    nats: NatsServer
    s3: SeaweedFS
    data_dir: Path
    bucket: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:10]}")

    def settings(self, namespace: str) -> Settings:
        return Settings(
            data_dir=self.data_dir / "darkroom",
            namespace=namespace,
            log_level="warning",
            nats=NatsSettings(url=self.nats.url),
            s3=S3Settings(
                endpoint=self.s3.url,
                access_key=self.s3.credentials.access_key,
                secret_key=SecretStr(self.s3.credentials.secret_key),
                bucket=self.bucket,
            ),
        )


async def _quiet_error(exc: Exception) -> None:
    log.warning("NATS client: %s: %s", type(exc).__name__, exc)


async def _connect(url: str, name: str) -> NATS:
    return await nats.connect(url, name=name, error_cb=_quiet_error, max_reconnect_attempts=0)


async def _close(nc: NATS) -> None:
    try:
        await asyncio.wait_for(nc.drain(), STOP_TIMEOUT_S)
    except Exception:
        await nc.close()


# --- the benchmark -----------------------------------------------------------------------------
@dataclass
class Options:
    n: int
    pace: float
    paced_n: int
    concurrency: int
    rounds: int
    warmup: int
    variants: tuple[str, ...]


def make_chain(variant: str, servers: Servers, opts: Options, mode: str) -> Chain:
    if variant == "darkroom":
        return DarkroomChain(servers, opts.concurrency)
    return BaselineChain(servers, BASELINE_PACED if mode == "paced" else BASELINE_SATURATED)


async def measure(
    client: Client, servers: Servers, opts: Options, variant: str, mode: str
) -> RunResult:
    """Start a fresh chain, warm it up, measure one run, stop it."""
    chain = make_chain(variant, servers, opts, mode)
    await chain.start()
    try:
        await drive(client, chain, opts.warmup, None, "warmup")
        await asyncio.sleep(0.2)  # let the warm-up's acks and pull requests settle
        if mode == "paced":
            result = await drive(client, chain, opts.paced_n, opts.pace, mode)
        else:
            result = await drive(client, chain, opts.n, None, mode)
    finally:
        await chain.stop()
    print(result.line(), flush=True)
    return result


def _best(results: list[RunResult], variant: str, mode: str) -> RunResult | None:
    mine = [r for r in results if r.variant == variant and r.mode == mode]
    return max(mine, key=lambda r: r.chains_per_s, default=None)


def _pooled(results: list[RunResult], variant: str, mode: str) -> list[float]:
    return [v for r in results if r.variant == variant and r.mode == mode for v in r.latencies_ms]


def summarize(results: list[RunResult], opts: Options, elapsed_s: float) -> dict[str, Any]:
    dark = _best(results, "darkroom", "saturated")
    base = _best(results, "baseline", "saturated")
    dark_paced = _pooled(results, "darkroom", "paced")
    base_paced = _pooled(results, "baseline", "paced")
    dark_rate = dark.chains_per_s if dark else math.nan
    base_rate = base.chains_per_s if base else math.nan
    dark_rounds = [
        r.chains_per_s for r in results if r.variant == "darkroom" and r.mode == "saturated"
    ]
    base_rounds = [
        r.chains_per_s for r in results if r.variant == "baseline" and r.mode == "saturated"
    ]
    # Each round's two runs were back to back, so their ratio shares the machine's mood;
    # the median of those ratios is steadier than best-against-best on a noisy host.
    round_ratios = [d / b for d, b in zip(dark_rounds, base_rounds, strict=False) if b]
    summary: dict[str, Any] = {
        "darkroom_chains_per_s": rounded(dark_rate),
        "baseline_chains_per_s": rounded(base_rate),
        "ratio": rounded(dark_rate / base_rate) if base_rate else None,
        "round_ratios": [round(r, 3) for r in round_ratios],
        "median_round_ratio": rounded(statistics.median(round_ratios)) if round_ratios else None,
        "paced_p50_ms": rounded(percentile(dark_paced, 50)),
        "paced_p95_ms": rounded(percentile(dark_paced, 95)),
        "paced_p99_ms": rounded(percentile(dark_paced, 99)),
        "saturated_p50_ms": rounded(dark.p(50)) if dark else None,
        "saturated_p99_ms": rounded(dark.p(99)) if dark else None,
        "baseline_paced_p50_ms": rounded(percentile(base_paced, 50)),
        "baseline_paced_p95_ms": rounded(percentile(base_paced, 95)),
        "baseline_paced_p99_ms": rounded(percentile(base_paced, 99)),
        "baseline_saturated_p50_ms": rounded(base.p(50)) if base else None,
        "baseline_saturated_p99_ms": rounded(base.p(99)) if base else None,
        "darkroom_rounds_chains_per_s": [round(r, 1) for r in dark_rounds],
        "baseline_rounds_chains_per_s": [round(r, 1) for r in base_rounds],
        "n": opts.n,
        "pace": opts.pace,
        "paced_n": opts.paced_n,
        "concurrency": opts.concurrency,
        "rounds": opts.rounds,
        "elapsed_s": round(elapsed_s, 1),
    }
    return summary


def print_summary(summary: dict[str, Any], opts: Options) -> None:
    def fmt(key: str, unit: str = "") -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.2f}{unit}"

    print()
    print(f"Summary ({opts.rounds} round(s), N={opts.n}, paced {opts.paced_n} at {opts.pace:g}/s):")
    print(
        f"  throughput  darkroom {fmt('darkroom_chains_per_s')} chains/s, "
        f"baseline {fmt('baseline_chains_per_s')} chains/s, ratio {fmt('ratio')} "
        f"(target >= 0.75); median of round ratios {fmt('median_round_ratio')}"
    )
    print(
        f"  paced       darkroom p50 {fmt('paced_p50_ms', ' ms')} (target <= 5 ms), "
        f"p95 {fmt('paced_p95_ms', ' ms')}, p99 {fmt('paced_p99_ms', ' ms')}"
    )
    print(
        f"              baseline p50 {fmt('baseline_paced_p50_ms', ' ms')}, "
        f"p95 {fmt('baseline_paced_p95_ms', ' ms')}, p99 {fmt('baseline_paced_p99_ms', ' ms')}"
    )
    print(
        f"  saturated   darkroom p50 {fmt('saturated_p50_ms', ' ms')}, "
        f"p99 {fmt('saturated_p99_ms', ' ms')}; "
        f"baseline p50 {fmt('baseline_saturated_p50_ms', ' ms')}, "
        f"p99 {fmt('baseline_saturated_p99_ms', ' ms')}"
    )
    print(f"  whole run   {summary['elapsed_s']:.1f} s")


async def run(opts: Options) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        root = Path(tmp)
        nats_server = NatsServer(root / "nats-data", port=0)
        s3_server = SeaweedFS(
            root / "s3-data", S3Credentials.load_or_create(root / "s3.json"), port=0
        )
        await nats_server.start()
        try:
            await s3_server.start()
            try:
                servers = Servers(nats_server, s3_server, root)
                nc = await _connect(nats_server.url, "bench-producer")
                client = Client(nc, nc.jetstream(timeout=10.0))
                try:
                    results: list[RunResult] = []
                    print(f"nats-server {nats_server.url}, SeaweedFS {s3_server.url}", flush=True)
                    for mode in ("saturated", "paced"):
                        for _ in range(opts.rounds):
                            for variant in opts.variants:
                                results.append(await measure(client, servers, opts, variant, mode))
                finally:
                    await _close(nc)
            finally:
                await s3_server.stop()
        finally:
            await nats_server.stop()
    summary = summarize(results, opts, time.perf_counter() - started)
    print_summary(summary, opts)
    return summary


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="chains per saturated run")
    parser.add_argument("--pace", type=float, default=25.0, help="chains/s in the paced run")
    parser.add_argument("--paced-n", type=int, default=250, help="chains per paced run")
    parser.add_argument("--concurrency", type=int, default=256, help="darkroom handlers per stage")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per variant")
    parser.add_argument("--warmup", type=int, default=200, help="chains before each run")
    parser.add_argument("--only", choices=("darkroom", "baseline"), help="run one variant")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.paced_n, args.rounds, args.warmup = 300, 40, 1, 50
    if min(args.n, args.paced_n, args.rounds, args.warmup, args.concurrency) < 1 or args.pace <= 0:
        parser.error("counts must be >= 1 and --pace > 0")
    variants = (args.only,) if args.only else ("darkroom", "baseline")
    return Options(
        n=args.n,
        pace=args.pace,
        paced_n=args.paced_n,
        concurrency=args.concurrency,
        rounds=args.rounds,
        warmup=args.warmup,
        variants=variants,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
