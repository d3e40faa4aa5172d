"""Health, readiness, metrics, system status and dead letters."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.js.errors
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bus.context import Context
from bus.function import registered_names
from bus.gateway.problems import Problem, json_response, problem_response
from bus.gateway.state import CTX
from bus.settings import Settings

MAX_DEAD_LETTERS = 200


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    checks: dict[str, str] = {}
    checks["nats"] = "ok" if ctx.nc.is_connected else "disconnected"
    try:
        await asyncio.wait_for(ctx.store.stat("readyz-probe"), 3.0)
        checks["s3"] = "ok"
    except Exception as exc:
        checks["s3"] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return json_response({"status": "ready", "checks": checks})
    return problem_response(503, "Not ready", "a dependency is unavailable", checks=checks)


def _function_names(settings: Settings) -> list[str]:
    return [n for n in registered_names() if settings.function(n).enabled]


async def consumer_stats(ctx: Context) -> list[dict[str, Any]]:
    out = []
    for name in _function_names(ctx.settings):
        try:
            info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable(name))
        except nats.js.errors.NotFoundError:
            out.append({"function": name, "deployed": False})
            continue
        pending, ack_pending = info.num_pending or 0, info.num_ack_pending or 0
        ctx.metrics.consumer_pending.labels(function=name).set(pending)
        ctx.metrics.consumer_ack_pending.labels(function=name).set(ack_pending)
        out.append(
            {
                "function": name,
                "deployed": True,
                "pending": pending,
                "ack_pending": ack_pending,
                "redelivered": info.num_redelivered or 0,
                "waiting_pulls": info.num_waiting or 0,
            }
        )
    return out


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    await consumer_stats(ctx)
    return web.Response(
        body=generate_latest(ctx.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    stream = await ctx.js.stream_info(ctx.names.stream)
    dlq = await ctx.js.stream_info(ctx.names.dlq_stream)
    return json_response(
        {
            "namespace": ctx.names.namespace,
            "profile": ctx.settings.profile,
            "functions": await consumer_stats(ctx),
            "stream": {
                "name": stream.config.name,
                "messages": stream.state.messages,
                "bytes": stream.state.bytes,
            },
            "dead_letters": dlq.state.messages,
            "store": {"url": ctx.store.url, "bucket": ctx.store.bucket},
        }
    )


async def dead_letters(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    stage = request.query.get("stage")
    raw_limit = request.query.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_DEAD_LETTERS:
        raise Problem(
            400, "Bad query parameter", f"limit must be 1-{MAX_DEAD_LETTERS}, got {raw_limit!r}"
        )
    limit = int(raw_limit)
    info = await ctx.js.stream_info(ctx.names.dlq_stream)
    items: list[dict[str, Any]] = []
    seq = info.state.last_seq
    while seq >= max(1, info.state.first_seq) and len(items) < limit:
        try:
            msg = await ctx.js.get_msg(ctx.names.dlq_stream, seq)
        except nats.js.errors.NotFoundError:
            seq -= 1
            continue
        seq -= 1
        record = orjson.loads(msg.data or b"{}")
        if stage and record.get("stage") != stage:
            continue
        record["dlq_seq"] = msg.seq
        items.append(record)
    return json_response({"items": items})
