"""Connecting to NATS: bounded start-up time, one log line per problem, version checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

log = logging.getLogger("darkroom.nats")

# JetStream API level 1 arrived with nats-server 2.11, which brought per-message TTLs.
MIN_API_LEVEL = 1
MIN_VERSION = "2.11"


class NatsUnavailableError(Exception):
    """NATS cannot be reached, or it is too old for darkroom."""


async def connect(servers: list[str], name: str, timeout: float = 10.0) -> NATS:
    """Connect to ``servers`` within ``timeout`` seconds, or raise naming the URL.

    After the first connection the client reconnects forever; each disconnect is logged
    once instead of a traceback per attempt.
    """
    last_error: list[str] = []
    quiet_until = [0.0]

    async def error_cb(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}".strip()
        last_error[:] = [text]
        now = time.monotonic()
        if now >= quiet_until[0]:
            quiet_until[0] = now + 10.0
            log.warning("NATS connection problem (%s): %s", ", ".join(servers), text)

    async def disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected_cb() -> None:
        log.info("reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")

    nc = NATS()
    try:
        await asyncio.wait_for(
            nc.connect(
                servers=servers,
                name=name,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                connect_timeout=max(1, min(int(timeout), 3)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                pending_size=64 * 1024 * 1024,
            ),
            timeout,
        )
    except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
        await _close_quietly(nc)
        why = last_error[0] if last_error else f"{type(exc).__name__}: {exc}"
        raise NatsUnavailableError(
            f"cannot reach NATS at {', '.join(servers)} within {timeout:.0f} s ({why})"
        ) from None
    return nc


def reconnect_count(nc: NATS) -> int:
    """How many times this connection has reconnected (state tied to a connection, such
    as pull requests and watches, must be renewed when it changes)."""
    return int(nc.stats.get("reconnects", 0))


async def _close_quietly(nc: NATS) -> None:
    with contextlib.suppress(Exception):  # best effort while already failing
        await nc.close()


async def check_jetstream(js: JetStreamContext, servers: list[str]) -> None:
    """Fail clearly unless JetStream is enabled and new enough for per-message TTLs."""
    try:
        info = await js.account_info()
    except nats.js.errors.ServiceUnavailableError:
        raise NatsUnavailableError(
            f"NATS at {', '.join(servers)} has JetStream disabled; start it with -js"
        ) from None
    except nats.errors.NoRespondersError:
        raise NatsUnavailableError(
            f"NATS at {', '.join(servers)} has no JetStream; start it with -js"
        ) from None
    level = info.api.level if info.api is not None else None
    if level is None or level < MIN_API_LEVEL:
        raise NatsUnavailableError(
            f"NATS at {', '.join(servers)} reports JetStream API level {level or 0} "
            f"(server {js._nc.connected_server_version}); darkroom needs level "
            f">= {MIN_API_LEVEL} (nats-server {MIN_VERSION} or newer) for per-message TTLs"
        )
