"""Connecting to NATS: bounded start-up time, one log line per problem, version checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from bus.core.redact import redact_text, redact_url
from bus.core.settings import NatsSettings
from bus.infra.nats_auth import Role, inbox_prefix

log = logging.getLogger("darkroom.nats")

# JetStream API level 2 arrived with nats-server 2.12: per-message TTLs (2.11), and pull
# consumers with the "prioritized" priority policy that model affinity uses (2.12).
MIN_API_LEVEL = 2
MIN_VERSION = "2.12"


class NatsUnavailableError(Exception):
    """NATS cannot be reached, or it is too old for darkroom."""


def credentials(settings: NatsSettings) -> dict[str, Any]:
    """nats-py ``connect`` arguments for the configured way to authenticate and TLS."""
    out: dict[str, Any] = {}
    if settings.user is not None and settings.password is not None:
        out["user"] = settings.user
        out["password"] = settings.password.get_secret_value()
    if settings.token is not None:
        out["token"] = settings.token.get_secret_value()
    if settings.nkey_seed is not None:
        out["nkeys_seed_str"] = settings.nkey_seed.get_secret_value()
    if settings.creds_file is not None:
        out["user_credentials"] = str(settings.creds_file.expanduser())
    if settings.uses_tls:
        context = ssl.create_default_context(
            cafile=str(settings.tls_ca.expanduser()) if settings.tls_ca else None
        )
        if settings.tls_cert is not None and settings.tls_key is not None:
            context.load_cert_chain(
                str(settings.tls_cert.expanduser()), str(settings.tls_key.expanduser())
            )
        out["tls"] = context
    return out


def where(servers: list[str]) -> str:
    """The servers, for messages: never a password."""
    return ", ".join(redact_url(s) for s in servers)


async def connect(
    settings: NatsSettings, name: str, timeout: float = 10.0, role: Role = Role.GATEWAY
) -> NATS:
    """Connect as a process of ``role`` within ``timeout`` seconds, or raise naming the
    (redacted) URL.

    After the first connection the client reconnects forever; each disconnect is logged
    once instead of a traceback per attempt. Credentials the server refuses fail at once,
    saying so, and an operation the role may not do is logged as a permission problem.
    """
    servers = settings.servers
    shown = where(servers)
    last_error: list[str] = []
    quiet_until = [0.0]
    refused = asyncio.Event()

    async def error_cb(exc: Exception) -> None:
        text = redact_text(f"{type(exc).__name__}: {exc}".strip())
        if not refused.is_set():  # keep the refusal, not the hang-up that follows it
            last_error[:] = [text]
        if _is_auth_failure(text):
            refused.set()
        now = time.monotonic()
        if "permissions violation" in text.lower():
            log.warning("NATS refused an operation for this process's role: %s", text)
        elif now >= quiet_until[0]:
            quiet_until[0] = now + 10.0
            log.warning("NATS connection problem (%s): %s", shown, text)

    async def disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected_cb() -> None:
        url = nc.connected_url
        log.info("reconnected to NATS at %s", url.netloc.rsplit("@", 1)[-1] if url else "?")

    nc = NATS()
    connecting = asyncio.ensure_future(
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
            inbox_prefix=inbox_prefix(role),
            **credentials(settings),
        )
    )
    watching = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, watching}, timeout=timeout, return_when="FIRST_COMPLETED")
        if connecting.done() and not connecting.cancelled():
            connecting.result()  # raises what connect raised
        if not nc.is_connected:
            raise TimeoutError
    except (TimeoutError, nats.errors.NoServersError, OSError, nats.errors.Error) as exc:
        connecting.cancel()
        await _close_quietly(nc)
        why = last_error[0] if last_error else redact_text(f"{type(exc).__name__}: {exc}")
        if refused.is_set():
            raise NatsUnavailableError(
                f"NATS at {shown} refused darkroom's credentials ({why}); set nats.user and "
                "nats.password, nats.token, nats.nkey_seed or nats.creds_file "
                "(DARKROOM_NATS__...)"
            ) from None
        raise NatsUnavailableError(
            f"cannot reach NATS at {shown} within {timeout:.0f} s ({why})"
        ) from None
    finally:
        watching.cancel()
    return nc


def _is_auth_failure(text: str) -> bool:
    lowered = text.lower()
    return "authorization violation" in lowered or "authentication" in lowered


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
            f"NATS at {where(servers)} has JetStream disabled; start it with -js"
        ) from None
    except nats.errors.NoRespondersError:
        raise NatsUnavailableError(
            f"NATS at {where(servers)} has no JetStream; start it with -js"
        ) from None
    level = info.api.level if info.api is not None else None
    if level is None or level < MIN_API_LEVEL:
        raise NatsUnavailableError(
            f"NATS at {where(servers)} reports JetStream API level {level or 0} "
            f"(server {js._nc.connected_server_version}); darkroom needs level "
            f">= {MIN_API_LEVEL} (nats-server {MIN_VERSION} or newer) for per-message TTLs "
            "and prioritized consumers"
        )
