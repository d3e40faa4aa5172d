"""Request-reply services: what a function answers directly, next to its events.

Some work is asked for by someone waiting (the gateway embedding a search query, a chat
completion), not announced by an object landing: it must not queue behind a stream of
events, and nothing needs to be stored. A function serves it on plain NATS
(``<ns>-rpc.<name>``), its workers sharing the requests as a queue group, so any number of
them answer and a request reaches only one.

The protocol is JSON both ways. A reply is one message (``{"ok": ...}`` or
``{"error": ...}``), or for a stream several ``{"chunk": ...}`` messages closed by
``{"end": true}`` (or an error). :func:`request` and :func:`stream` are the caller's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger("darkroom.services")

MAX_REQUEST_BYTES = 900 * 1024  # below NATS's default 1 MB payload limit


class ServiceError(Exception):
    """A request the service refused or failed; ``status`` follows HTTP's meaning (400 a
    bad request, 404 unknown, 503 not available now), so a gateway can pass it on."""

    def __init__(self, message: str, status: int = 500, code: str = "service_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class NoResponderError(ServiceError):
    """No worker serves this name right now (none running, or still preparing)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no worker is serving {name!r} right now: start one, or wait for it to finish "
            "loading its models",
            status=503,
            code="no_responder",
        )


# --- the serving side ----------------------------------------------------------------------


def parse_request(msg: Msg) -> dict[str, Any]:
    """A request's JSON object, or a 400 :class:`ServiceError`."""
    try:
        doc = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        raise ServiceError("the request is not JSON", 400, "invalid_request") from None
    if not isinstance(doc, dict):
        raise ServiceError("the request must be a JSON object", 400, "invalid_request")
    return doc


async def reply(nc: NATS, msg: Msg, result: Any) -> None:
    await _send(nc, msg, {"ok": result})


async def reply_chunk(nc: NATS, msg: Msg, chunk: Any) -> None:
    await _send(nc, msg, {"chunk": chunk})


async def reply_end(nc: NATS, msg: Msg) -> None:
    await _send(nc, msg, {"end": True})


async def reply_error(nc: NATS, msg: Msg, error: ServiceError) -> None:
    body = {"message": error.message, "status": error.status, "code": error.code}
    await _send(nc, msg, {"error": body})


async def _send(nc: NATS, msg: Msg, doc: dict[str, Any]) -> None:
    if msg.reply:
        await nc.publish(msg.reply, orjson.dumps(doc))


# --- the calling side ----------------------------------------------------------------------


def _encode(payload: dict[str, Any]) -> bytes:
    data = orjson.dumps(payload)
    if len(data) > MAX_REQUEST_BYTES:
        raise ServiceError(
            f"the request is {len(data)} bytes; at most {MAX_REQUEST_BYTES} fit",
            413,
            "request_too_large",
        )
    return data


def _outcome(name: str, data: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ServiceError(f"{name!r} answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise ServiceError(f"{name!r} answered something that is not a JSON object")
    error = doc.get("error")
    if isinstance(error, dict):
        raise ServiceError(
            str(error.get("message", "the service failed")),
            int(error.get("status", 500)),
            str(error.get("code", "service_error")),
        )
    return doc


async def request(
    nc: NATS, subject: str, payload: dict[str, Any], timeout: float, name: str = ""
) -> Any:
    """Ask a service once; its ``ok`` result, or :class:`ServiceError` (a 503 when nobody
    serves it, a 504 when nobody answered in ``timeout``)."""
    name = name or subject
    try:
        msg = await nc.request(subject, _encode(payload), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise NoResponderError(name) from None
    except nats.errors.TimeoutError:
        raise ServiceError(
            f"{name!r} did not answer within {timeout:g} s", 504, "timeout"
        ) from None
    return _outcome(name, msg.data).get("ok")


async def stream(
    nc: NATS,
    subject: str,
    payload: dict[str, Any],
    first_timeout: float,
    gap_timeout: float,
    name: str = "",
) -> AsyncIterator[Any]:
    """Ask a streaming service; yields each chunk until the end message.

    ``first_timeout`` bounds the wait for the first message (a model may be busy with a
    batch), ``gap_timeout`` the wait between later ones. Leaving the iteration early
    unsubscribes, so the worker's later chunks go nowhere.
    """
    name = name or subject
    inbox = nc.new_inbox()  # under this process's role's own inbox prefix
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def deliver(msg: Msg) -> None:
        await queue.put(msg)

    sub = await nc.subscribe(inbox, cb=deliver)
    try:
        # With no subscriber the server answers the reply subject with an empty 503 status.
        await nc.publish(subject, _encode(payload), reply=inbox)
        timeout = first_timeout
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                raise ServiceError(
                    f"{name!r} did not answer within {timeout:g} s", 504, "timeout"
                ) from None
            if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
                raise NoResponderError(name)
            doc = _outcome(name, msg.data)
            if doc.get("end"):
                return
            if "chunk" in doc:
                yield doc["chunk"]
            timeout = gap_timeout
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
