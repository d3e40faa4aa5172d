"""Pipelined JetStream publishes: send now, learn later whether the stream stored it.

Like nats-py's ``publish_async``, but lighter on the hot path: replies arrive on one
wildcard inbox and are matched by a counter (no random token per message), and a PubAck
is only checked for an error, not parsed into an object.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import APIError, NoStreamResponseError


class Publisher:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._counter = 0
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[None]:
        """Send one message; the future resolves once JetStream stored it (or raises)."""
        self._counter += 1
        token = str(self._counter)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        future.add_done_callback(lambda _: self._waiting.pop(token, None))
        await self._nc.publish(
            subject, payload, reply=self._prefix + token, headers={"Nats-Msg-Id": msg_id}
        )
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(NoStreamResponseError())
            return
        try:
            reply: Any = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            future.set_exception(APIError(description=f"unreadable PubAck {msg.data[:100]!r}"))
            return
        if isinstance(reply, dict) and "error" in reply:
            future.set_exception(APIError.from_error(reply["error"]))
        else:
            future.set_result(None)
