"""Webhook delivery: signed deliveries per second to a local receiver, and the time to drain
a backlog after an outage.

:func:`webhook_figures` is the reusable part (the notify benchmark's webhook half): given
settings that point at running NATS, S3 and PostgreSQL servers, it starts the ``webhooks``
function (:mod:`bus.intake.webhooks`) in-process with a real aiohttp receiver on loopback,
and measures

* ``webhooks_per_s``: ``deliveries`` messages queued at full speed for one endpoint, each
  POSTed, signed per Standard Webhooks, answered 204 and logged in the read model: messages
  over the time from the first arrival to the last. The receiver verifies one signature in
  every 50 with the ``standardwebhooks`` library (all of them would measure the receiver);
* ``backlog_drain_s``: the receiver answers 503 while ``backlog`` messages are queued and
  retried on a short schedule (``OUTAGE_SCHEDULE_S``, standing in for the real one's
  minutes and hours), for ``outage_s`` seconds; then it recovers. The time from the recovery
  until every message has arrived, each once (deduplicated by webhook-id).

Deliveries are queued straight onto the work queue, as the fan-out queues them, so the
figures are the delivery stage's. Standalone, ``python -m tests.bench.bench_webhooks``
starts nats-server, SeaweedFS and PostgreSQL in a temporary directory and prints the
figures as JSON, last (``--quick``: a smaller run).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks import Webhook

from bus.core.envelope import Event, new_id, now_iso
from bus.core.settings import Settings, WebhookSettings
from bus.intake.webhooks import FUNCTION, cloud_event
from bus.ops.embedded import NatsServer, S3Credentials, SeaweedFS
from bus.ops.pgserver import PostgresServer
from bus.runtime.context import Context, open_context
from bus.runtime.runner import FunctionRunner
from bus.state.webhooks import Webhooks, delivery, new_secret, webhook_id
from tests.bench.report import rounded, run_and_report
from tests.bench.stack import server_settings

OUTAGE_SCHEDULE_S = (0.0, 0.5, 1.0, 2.0, *([2.0] * 46))
VERIFY_EVERY = 50
TIMEOUT_S = 600.0


class Receiver:
    """Counts each webhook-id once; answers 503 while ``down``."""

    def __init__(self, secret: str) -> None:
        self.hook = Webhook(secret)
        self.down = False
        self.seen: set[str] = set()
        self.first = 0.0
        self.last = 0.0
        self.expected = 0
        self.all_in = asyncio.Event()
        self.bad = 0
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def expect(self, count: int) -> None:
        self.seen.clear()
        self.first = self.last = 0.0
        self.expected = count
        self.all_in.clear()

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if self.down:
            return web.Response(status=503)
        if self.requests % VERIFY_EVERY == 0:
            try:
                self.hook.verify(body, dict(request.headers))
            except Exception:
                self.bad += 1
                return web.Response(status=400)
        wid = request.headers["webhook-id"]
        if wid not in self.seen:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.seen.add(wid)
            if len(self.seen) >= self.expected:
                self.all_in.set()
        return web.Response(status=204)


async def _queue(ctx: Context, deliverer: Any, endpoint_id: str, count: int) -> None:
    """Queue ``count`` deliveries of fresh events, as the fan-out does."""
    acks = []
    for n in range(count):
        event = Event(
            id=f"bench-{new_id()}",
            type="captioned",
            source="darkroom/bench",
            time=now_iso(),
            subject=f"img{n}",
            image_id=f"img{n}",
            data={"caption": "a lighthouse at dusk", "n": n},
        )
        wid = webhook_id(endpoint_id, event.id)
        item = delivery(endpoint_id, wid, event.id, event.type, cloud_event(event))
        acks.append(
            await ctx.js.publish_async(
                deliverer.hooks.subject(endpoint_id),
                orjson.dumps(item),
                headers={"Nats-Msg-Id": wid},
            )
        )
    await asyncio.gather(*acks)


async def webhook_figures(
    settings: Settings,
    deliveries: int = 5000,
    backlog: int = 10_000,
    outage_s: float = 10.0,
    concurrency: int = 256,
) -> dict[str, Any]:
    """Measure delivery against the servers ``settings`` name (see the module docstring),
    in a namespace of its own."""
    hooks = WebhookSettings(
        schedule_s=OUTAGE_SCHEDULE_S,
        allow_networks=("127.0.0.0/8",),  # type: ignore[arg-type]
        concurrency=concurrency,
    )
    settings = settings.model_copy(
        update={"namespace": f"whb{uuid.uuid4().hex[:8]}", "webhooks": hooks}
    )
    secret = new_secret()
    receiver = Receiver(secret)
    await receiver.start()
    try:
        async with open_context(settings, [FUNCTION.spec], "bench-webhooks", database=True) as ctx:
            assert ctx.db is not None
            endpoint = await Webhooks(ctx.db.pool).create(receiver.url, secret, None, "bench")
            runner = FunctionRunner(FUNCTION, ctx)
            await runner.start()
            try:
                deliverer = runner.state
                # Throughput: queued at full speed while the deliverer takes them.
                receiver.expect(deliveries)
                await _queue(ctx, deliverer, endpoint.id, deliveries)
                await asyncio.wait_for(receiver.all_in.wait(), TIMEOUT_S)
                rate = deliveries / max(receiver.last - receiver.first, 1e-9)
                # Backlog: queued during an outage, retried on the short schedule.
                receiver.expect(backlog)
                receiver.down = True
                outage_started = time.perf_counter()
                await _queue(ctx, deliverer, endpoint.id, backlog)
                await asyncio.sleep(max(0.0, outage_s - (time.perf_counter() - outage_started)))
                attempts_in_outage = receiver.requests
                receiver.down = False
                recovered = time.perf_counter()
                await asyncio.wait_for(receiver.all_in.wait(), TIMEOUT_S)
                drain = receiver.last - recovered
            finally:
                await runner.drain(timeout=30)
    finally:
        await receiver.stop()
    if receiver.bad:
        raise RuntimeError(f"{receiver.bad} signatures did not verify")
    return {
        "webhooks_per_s": rounded(rate, 1),
        "backlog_drain_s": rounded(drain, 2),
        "webhook_deliveries": deliveries,
        "webhook_backlog": backlog,
        "webhook_outage_s": outage_s,
        "webhook_requests_total": attempts_in_outage,
        "webhook_concurrency": concurrency,
    }


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    pg = PostgresServer(root / "pg", port=0)
    nats = NatsServer(root / "nats", port=0)
    s3_dir = root / "s3"
    weed = SeaweedFS(s3_dir, S3Credentials.load_or_create(s3_dir / "s3.json"), port=0)
    try:
        await asyncio.gather(pg.start(), nats.start(), weed.start())
        bucket = f"bench{uuid.uuid4().hex[:10]}"
        settings = server_settings(root / "darkroom", pg, nats, weed, bucket)
        figures = await webhook_figures(
            settings, opts.deliveries, opts.backlog, opts.outage_s, opts.concurrency
        )
        print(
            f"{figures['webhooks_per_s']} signed deliveries/s; a backlog of "
            f"{opts.backlog:,} drained {figures['backlog_drain_s']} s after a "
            f"{opts.outage_s:g} s outage",
            file=sys.stderr,
        )
        return figures
    finally:
        await asyncio.gather(pg.stop(), nats.stop(), weed.stop(), return_exceptions=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.deliveries, opts.backlog, opts.outage_s = 2000, 10_000, 5.0
    return run_and_report(lambda: asyncio.run(run(opts)))


if __name__ == "__main__":
    sys.exit(main())
