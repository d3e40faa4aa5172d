"""Runs one function against its durable JetStream consumer.

For each message: decode the envelope, call the handler, publish what it emits (ids
derived from the input, so replays dedupe), wait for every PubAck, then ack. Retry becomes
a nak with a delay; Reject, a malformed event, or the last failed delivery becomes a
dead-letter record plus a ``failed.<stage>`` event, then a term. Cancelled (raised by the
handler, or found flagged before it ran) becomes a ``cancelled.<stage>`` event and an ack.
Every message the runner holds (running, queued for a slot, or settling) gets an
``in_progress()`` heartbeat three times per ``ack_wait``, so ``ack_wait`` can be short and a
killed worker's messages come back within seconds. ``drain()`` stops asking for work and
finishes what started; what it has to give up it naks, so that returns at once.

Handlers run concurrently, one task per invocation. A batch function's events wait in a
queue until ``Spec.batch`` of them are there, or ``Spec.batch_wait_s`` has passed since the
first, and a batch starts only when one of ``concurrency`` invocation slots is free; the
consumer asks for one batch more than the slots hold, so the next batch forms while the
current ones run.

Settling is pipelined: one settler task takes every invocation that has finished,
publishes all their events, waits for all the PubAcks at once, then acks; under load a group
costs one round trip instead of one per message, and a slow handler never holds up anyone
else's ack. A handler that runs past ``Spec.timeout`` is cancelled and retried: heartbeats
keep long work alive, not hung work.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.core.contract import Cancelled, Emit, Model, Reject, Retry
from bus.core.envelope import EnvelopeError, Event, decode, derive_id, now_iso
from bus.core.subjects import CANCELLED, is_safe_id
from bus.gpu.leases import read_devices
from bus.infra.tasks import cancel_and_wait, say_still_running
from bus.runtime.call import Call, Progress
from bus.runtime.context import Context
from bus.runtime.publisher import Publisher
from bus.runtime.pull import PullConsumer
from bus.runtime.registry import Function, Service
from bus.runtime.services import ServiceError, reply_error
from bus.runtime.streams import (
    AFFINITY_GROUP,
    declare_keyed_consumer,
    keyed_stage,
    listen_subjects,
)
from bus.state.cancels import CancelFlag, targets

log = logging.getLogger("darkroom.runner")

PUBLISH_TIMEOUT_S = 10.0
CANCEL_WAIT_S = 10.0  # how long a stop waits for a cancelled handler to end
PREPARE_RETRY_S = (5.0, 30.0, 120.0, 300.0)  # waits between failed preparations (last repeats)
MAX_DLQ_PAYLOAD = 64 * 1024
HOLDERS_REFRESH_S = 2.0  # how often a worker reads who holds which model from the ledger


@dataclass(slots=True)
class _Work:
    msg: Msg
    source: PullConsumer  # the consumer it came from, told when it is finished
    started: float  # when it arrived: heartbeats count from here, queued or running
    event: Event | None = None
    call: Call | None = None
    result: Sequence[Emit] | BaseException | None = None
    beats: int = field(default=0)


class FunctionRunner:
    """One function, one durable consumer, ``concurrency`` handler invocations at a time."""

    def __init__(self, fn: Function, ctx: Context, concurrency: int | None = None) -> None:
        self.fn = fn
        self.spec = fn.spec
        self.ctx = ctx
        self.concurrency = (
            concurrency
            or ctx.settings.function(self.spec.name).concurrency
            or self.spec.concurrency
        )
        self.stage = self.spec.name
        self._names = ctx.names
        self._durable = ctx.names.durable(self.stage)
        batch = self.spec.batch
        self._capacity = self.concurrency if batch == 1 else (self.concurrency + 1) * batch
        self._affinity = fn.affinity
        shared = self._budget if fn.affinity is not None else None
        self._consumer = self._events_consumer(self._durable, shared)
        self._consumers = [self._consumer]
        self._keys: list[str] = []
        self._held_elsewhere: frozenset[str] = frozenset()  # lease model names others hold
        self._holders_task: asyncio.Task[None] | None = None
        if fn.affinity is not None:
            affinity = fn.affinity
            self._keys = list(affinity.keys(ctx.settings))
            for key in self._keys:
                durable = ctx.names.durable(keyed_stage(self.stage, key))
                self._consumers.append(
                    self._events_consumer(
                        durable,
                        shared,
                        group=AFFINITY_GROUP,
                        priority=functools.partial(self._priority, key),
                    )
                )
        self._queued: list[_Work] = []  # batch functions: events waiting to form a batch
        self._dispatch_scheduled = False
        self._linger: asyncio.TimerHandle | None = None
        self._running = 0  # invocations started and not finished
        self._draining = False  # partial batches go without lingering
        self._stopping = False  # nothing new starts
        self._stopped = False  # stop() has begun: drain() and stop() wait for it
        self._stop_task: asyncio.Future[None] | None = None
        self._abandoned: set[asyncio.Future[Any]] = set()  # ignored their cancellation
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[int, _Work] = {}
        self._to_settle: list[_Work] = []
        self._settle_wanted = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._settler: asyncio.Task[None] | None = None
        self._publisher = Publisher(ctx.nc)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._set_up = False
        self.state: Any = None  # what the function's setup returned (its models...)
        self.ready = asyncio.Event()  # prepared: fetching events and serving requests
        self._preparing: asyncio.Task[None] | None = None
        self._service_subs: list[Subscription] = []
        self._service_tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._advisories = [
            self._advisory_consumer(ctx.names.exhausted_durable(stage))
            for stage in [self.stage, *(keyed_stage(self.stage, key) for key in self._keys)]
        ]
        metrics = ctx.metrics
        self._m_outcome = {
            outcome: metrics.handled.labels(function=self.stage, outcome=outcome)
            for outcome in ("ok", "retry", "cancelled", "dead_lettered")
        }
        metrics.in_flight.labels(function=self.stage).set_function(self._in_flight)
        self._m_seconds = metrics.handler_seconds.labels(function=self.stage)
        self.subjects = listen_subjects(ctx.names, self.spec, ctx.settings.function(self.stage))

    def _events_consumer(
        self,
        durable: str,
        budget: Callable[[], int] | None,
        group: str | None = None,
        priority: Callable[[], int] | None = None,
    ) -> PullConsumer:
        consumer: PullConsumer

        def on_message(msg: Msg) -> None:
            self._accept(msg, consumer)

        consumer = PullConsumer(
            self.ctx.nc,
            self._names.stream,
            durable,
            capacity=self._capacity,
            on_message=on_message,
            group=group,
            priority=priority,
            budget=budget,
        )
        return consumer

    def _advisory_consumer(self, durable: str) -> PullConsumer:
        consumer: PullConsumer

        def on_message(advisory: Msg) -> None:
            self._accept_exhausted(advisory, consumer)

        consumer = PullConsumer(
            self.ctx.nc, self._names.advisory_stream, durable, capacity=1, on_message=on_message
        )
        return consumer

    def _in_flight(self) -> int:
        return sum(c.in_flight for c in self._consumers)

    def _budget(self) -> int:
        """Room left in the in-flight limit the keyed consumers share with the plain one."""
        return self._capacity - self._in_flight()

    def _priority(self, key: str) -> int:
        """The priority of this worker's next pull request for ``key`` (see Affinity).

        What it holds is what it has leases for: a lease is granted before the load, and
        a worker making room for a load counts as holding another model.
        """
        assert self._affinity is not None
        model = self._affinity.model(key)
        gpu = self.ctx.gpu
        mine = {lease.model for lease in gpu.ledger.held} if gpu is not None else set()
        if model in mine:
            return 0
        if not mine and not (gpu is not None and gpu.waiting):
            return 1  # idle: the load evicts nothing
        # Who holds what is read every few seconds: it only orders busy workers.
        return 3 if model in self._held_elsewhere else 2

    def _reconsider(self) -> None:
        """What this worker or others hold may have changed: renew stale keyed requests."""
        for consumer in self._consumers[1:]:
            consumer.reconsider()

    async def _watch_holders(self) -> None:
        """Keep :attr:`_held_elsewhere` current from the VRAM lease ledger."""
        while True:
            await asyncio.sleep(HOLDERS_REFRESH_S)
            with contextlib.suppress(Exception):  # the ledger is back by the next look
                await self._read_holders()
            self._reconsider()

    async def _read_holders(self) -> None:
        gpu = self.ctx.gpu
        mine = gpu.ledger.holder.instance if gpu is not None else ""
        devices = await read_devices(self.ctx.js, self._names.leases_kv)
        self._held_elsewhere = frozenset(
            str(lease["model"])
            for device in devices
            for lease in device["leases"]
            if lease["holder"]["instance"] != mine
        )

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Set up, preload the models in ``high`` mode, then fetch; with ``prepare``, the
        preparation and the preload run in the background and fetching starts once they
        have finished (:attr:`ready`).

        If a step before fetching fails, what was started is stopped (teardown included)
        and the error is raised.
        """
        self._loop = asyncio.get_running_loop()
        try:
            if self.fn.setup is not None:
                self.state = await self.fn.setup(self.ctx)
            self._set_up = True
            gpu = self.ctx.gpu
            if self.spec.needs_gpu and gpu is not None:
                gpu.add_pressure_listener(self._vram_pressure)
            await self.ctx.cancels.start()
            self.ctx.cancels.add_listener(self._cancel_flagged)
            await self._publisher.start()
            self._settler = asyncio.create_task(self._settle_forever(), name=f"settle:{self.stage}")
            self._heartbeat_task = asyncio.create_task(
                self._heartbeats(), name=f"heartbeats:{self.stage}"
            )
            if self.fn.prepare is not None:
                self._preparing = asyncio.create_task(
                    self._prepare_then_fetch(), name=f"prepare:{self.stage}"
                )
            else:
                await self._preload()  # a model that can never fit fails the start
                await self._fetch()
        except BaseException:
            await self.stop()
            raise

    @property
    def models(self) -> list[Model]:
        """The Models this function loads (from its state), in the order it declared them."""
        return list(self.fn.models(self.state)) if self.fn.models is not None else []

    async def _preload(self) -> None:
        """In ``high`` mode, load the function's models now, so no event waits for them."""
        gpu = self.ctx.gpu
        if gpu is not None and gpu.residency.preload:
            for model in self.models:
                await gpu.preload(model)

    async def _fetch(self) -> None:
        """Start consuming events (and the advisories of exhausted ones) and serving."""
        if self._affinity is not None:
            for key in self._keys:
                await declare_keyed_consumer(
                    self.ctx.nc, self.ctx.js, self._names, self.spec, self._affinity.topic, key
                )
            try:
                await self._read_holders()
            except Exception as exc:  # until the next look, every model counts as unheld
                log.warning("%s: cannot read who holds which model yet: %s", self.stage, exc)
            self._holders_task = asyncio.create_task(
                self._watch_holders(), name=f"holders:{self.stage}"
            )
        for consumer in self._consumers:
            await consumer.start()
        # An event whose last delivery timed out (the worker crashed or hung every time)
        # is announced only by an advisory, kept in a stream until a worker records it.
        for consumer in self._advisories:
            await consumer.start()
        for name, service in self.fn.services.items():
            sub = await self.ctx.nc.subscribe(
                self._names.service(name),
                queue=self._names.service_group(self.stage),
                cb=self._serve_callback(name, service),
            )
            self._service_subs.append(sub)
        if self._service_subs:  # the server knows the subscriptions before anyone is told
            await self.ctx.nc.flush()
        self.ready.set()

    async def _prepare_then_fetch(self) -> None:
        """Prepare in the background (downloads), preload, then fetch; a failure of any
        step is logged and tried again with backoff, the events waiting in the stream."""
        attempt = 0
        prepared = False
        while True:
            attempt += 1
            try:
                if not prepared:
                    if self.fn.prepare is not None:
                        await self.fn.prepare(self.ctx, self.state)
                    await self._preload()
                    prepared = True
                await self._fetch()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._unfetch()  # a half-started fetch starts again from nothing
                delay = PREPARE_RETRY_S[min(attempt, len(PREPARE_RETRY_S)) - 1]
                log.error(
                    "%s: %s failed (attempt %d), trying again in %.0f s: %s",
                    self.stage,
                    "starting to fetch" if prepared else "preparing",
                    attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
        log.info("%s: prepared; fetching events", self.stage)

    def _serve_callback(self, name: str, service: Service) -> Callable[[Msg], Awaitable[None]]:
        async def on_request(msg: Msg) -> None:
            # One task per request: a slow answer never holds up the subscription.
            task = asyncio.create_task(self._serve(name, service, msg), name=f"rpc:{name}")
            self._service_tasks.add(task)
            task.add_done_callback(self._service_tasks.discard)

        return on_request

    async def _serve(self, name: str, service: Service, msg: Msg) -> None:
        try:
            await service(msg, self.ctx, self.state)
        except ServiceError as exc:
            await self._reply_error(msg, exc)
        except asyncio.CancelledError:
            await self._reply_error(msg, ServiceError("the worker is stopping", 503, "stopping"))
            raise
        except Exception as exc:
            log.exception("%s: service %s failed", self.stage, name)
            await self._reply_error(msg, ServiceError(f"{type(exc).__name__}: {exc}"))

    async def _reply_error(self, msg: Msg, error: ServiceError) -> None:
        with contextlib.suppress(Exception):  # the connection may be going away too
            await reply_error(self.ctx.nc, msg, error)

    def _vram_pressure(self, waiting: bool) -> None:
        """While a model load waits for VRAM, ask for no more work (backpressure)."""
        for consumer in self._consumers:
            if waiting:
                consumer.pause()
            else:
                consumer.resume()  # a stopped consumer stays stopped
        self._reconsider()  # what this worker holds is changing

    async def drain(self, timeout: float | None = None) -> None:
        """Stop fetching, finish in-flight work (acking it), then stop.

        Past ``timeout`` the handlers still running are cancelled, and their events and those
        not yet started are nakked: JetStream redelivers them to another worker at once.
        """
        if self._stopped:
            await self.stop()  # a stop under way, or done
            return
        await self._stop_fetching()
        self._draining = True
        self._dispatch()  # queued events go now, without lingering for more
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._tasks:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                log.warning(
                    "%s: %d task(s) and %d queued event(s) cut short by the drain timeout; "
                    "handing their events back",
                    self.stage,
                    len(self._tasks),
                    len(self._queued),
                )
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
        if self._service_tasks:  # requests being answered finish within what is left
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait(set(self._service_tasks), timeout=remaining)
        await self._halt()
        # Finished handlers still owe their events and acks: let the settler finish.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), PUBLISH_TIMEOUT_S + 5)
        await self.stop()

    async def _halt(self) -> None:
        """Start nothing more; hand queued events back; cancel what still runs (its
        invocations hand their events back as they end)."""
        self._stopping = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        queued, self._queued = self._queued, []
        await self._hand_back(queued)
        await self._cancel(self._tasks)

    async def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` once (a handler may clean up after its cancellation) and wait
        :data:`CANCEL_WAIT_S` at most. One still running then is left behind, said where it
        waits: the stop goes on without it, and what it finishes later goes back to the
        stream (see :meth:`_process`)."""
        stuck = await cancel_and_wait(
            *(tasks - self._abandoned), timeout=CANCEL_WAIT_S, recancel=False
        )
        for task in stuck:
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
        say_still_running(stuck, CANCEL_WAIT_S, then=f"; {self.stage} stops without it")

    async def _stop_fetching(self) -> None:
        await cancel_and_wait(self._preparing)
        self._preparing = None
        await self._unfetch()

    async def _unfetch(self) -> None:
        await cancel_and_wait(self._holders_task)
        self._holders_task = None
        for consumer in [*self._consumers, *self._advisories]:
            await consumer.stop()
        subs, self._service_subs = self._service_subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _stop_services(self) -> None:
        """Requests being answered get a 503 rather than silence."""
        await self._cancel(self._service_tasks)

    async def stop(self) -> None:
        """Stop at once (see :meth:`drain` for the graceful way); teardown runs last.

        It runs once: a later or concurrent call waits for that stop, which goes on should
        its caller be cancelled.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self._stopped = True
        await self._stop_fetching()
        await self._stop_services()
        await self._halt()
        await cancel_and_wait(self._heartbeat_task, self._settler)
        self._heartbeat_task = self._settler = None
        # What finished but was not settled yet goes back at once, for another worker.
        unsettled, self._to_settle = self._to_settle, []
        await self._hand_back(unsettled)
        await self._publisher.stop()
        with contextlib.suppress(ValueError):
            self.ctx.cancels.remove_listener(self._cancel_flagged)
        if self.ctx.gpu is not None:
            with contextlib.suppress(ValueError):
                self.ctx.gpu.remove_pressure_listener(self._vram_pressure)
        if self._set_up:
            self._set_up = False
            if self.fn.teardown is not None:
                await self.fn.teardown(self.ctx, self.state)

    # --- intake ----------------------------------------------------------------------------
    def _accept(self, msg: Msg, source: PullConsumer) -> None:
        if self._stopping:
            return  # never tracked, never acked: redelivered elsewhere
        work = _Work(msg, source, time.monotonic())
        self._active[id(msg)] = work
        if self.spec.batch == 1:
            self._spawn([work])
            return
        self._queued.append(work)
        if not self._dispatch_scheduled:
            # Whatever arrives in the same read is queued before the batch is cut.
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start batches while invocation slots are free: a full one at once, a partial one
        once the first event in it has waited ``batch_wait_s`` (or while draining)."""
        self._dispatch_scheduled = False
        size = self.spec.batch
        while self._queued and self._running < self.concurrency and not self._stopping:
            wait = self._queued[0].started + self.spec.batch_wait_s - time.monotonic()
            if len(self._queued) < size and wait > 0 and not self._draining:
                if self._linger is None:
                    self._linger = asyncio.get_running_loop().call_later(wait, self._lingered)
                return
            batch, self._queued = self._queued[:size], self._queued[size:]
            self._spawn(batch)

    def _lingered(self) -> None:
        self._linger = None
        self._dispatch()

    def _spawn(self, works: list[_Work]) -> None:
        self._running += 1
        task = asyncio.create_task(self._process(works))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget(self, works: list[_Work]) -> None:
        """Stop tracking ``works`` without settling them."""
        for work in works:
            self._active.pop(id(work.msg), None)
        self._release(works)

    def _release(self, works: list[_Work]) -> None:
        """``works`` are finished: their consumers may ask for more (any of them, when
        they share a budget)."""
        for work in works:
            work.source.release()
        if self._affinity is not None:
            for consumer in self._consumers:
                consumer.wake()
            self._reconsider()

    async def _hand_back(self, works: list[_Work], backoff: bool = False) -> None:
        """Nak ``works`` so another worker gets them now instead of after ``ack_wait`` (with
        ``backoff``: after the Spec's retry delay, so a runner fault cannot spin); a nak
        that cannot be sent leaves that to ``ack_wait``."""
        self._forget(works)
        for work in works:
            delivered = work.msg.metadata.num_delivered or 1
            delay = self.spec.retry_delay(delivered) if backoff else None
            with contextlib.suppress(Exception):
                await work.msg.nak(delay=delay)

    # --- processing ------------------------------------------------------------------------
    async def _process(self, works: list[_Work]) -> None:
        decoded: list[_Work] = []
        malformed: list[tuple[_Work, str]] = []
        for work in works:
            try:
                work.event = self._decode(work.msg.data)
                decoded.append(work)
            except EnvelopeError as exc:
                malformed.append((work, f"malformed event: {exc}"))
        handed_over = faulted = False
        try:
            if decoded:
                await self._invoke(decoded)
                if not self._stopped:  # else it outlived the stop: back to the stream
                    self._to_settle.extend(decoded)
                    handed_over = True
                    self._settled.clear()
                    self._settle_wanted.set()
            # After the batch, so a malformed neighbour never delays it.
            while malformed:
                work, reason = malformed[0]
                await self._guarded(self._dead_letter(work.msg, None, reason, "malformed"))
                malformed.pop(0)
                self._forget([work])
        except Exception:
            faulted = True  # a fault of the runner's own, not the handler's: logged below
            raise
        finally:
            self._running -= 1
            # What was neither settled nor handed to the settler (a drain timeout cancelled
            # us) goes back to the stream, for another worker.
            await self._hand_back(
                [w for w, _ in malformed] + ([] if handed_over else decoded), backoff=faulted
            )
            if self._queued:
                self._dispatch()

    async def _guarded(self, step: Any) -> None:
        try:
            await step
        except Exception:
            # NATS unreachable, most likely: the message stays un-acked and comes back.
            log.exception("%s: could not settle a message", self.stage)

    def _decode(self, payload: bytes) -> Event:
        if self.fn.decode_event is not None:
            try:
                event = self.fn.decode_event(payload)
            except Exception as exc:
                raise EnvelopeError(f"{self.fn.module}.decode_event failed: {exc!r}") from None
            if event is not None:
                return event
        return decode(payload)

    def _progress(self, event: Event) -> Progress | None:
        """The progress throttle of one invocation, made when it first reports; None when
        neither its job id nor its image id can name a subject."""
        target = next((i for i in (event.job_id, event.image_id) if i and is_safe_id(i)), None)
        if target is None:
            return None
        about = {
            "stage": self.stage,
            "event_id": event.id,
            "job_id": event.job_id,
            "image_id": event.image_id,
        }
        assert self._loop is not None, "started runners only"
        return Progress(self._loop, self.ctx.nc.publish, self._names.progress(target), about)

    def _call(self, work: _Work, deadline: float) -> Call:
        assert work.event is not None
        return Call(
            work.event,
            self.stage,
            attempt=work.msg.metadata.num_delivered or 1,
            max_attempts=self.spec.max_deliver,
            deadline=deadline,
            stream_seq=work.msg.metadata.sequence.stream,
            progress=self._progress,
            state=self.state,
        )

    async def _invoke(self, works: list[_Work]) -> None:
        """Run the handler on ``works``, leaving each one's result on it."""
        deadline = time.monotonic() + self.spec.timeout
        runnable: list[_Work] = []
        for work in works:
            assert work.event is not None
            # Checked and registered in one step (no await between): a flag set from here
            # on reaches the call through _cancel_flagged.
            reason = self._flag(work.event)
            if reason is not None:
                work.result = Cancelled(reason)
                continue
            work.call = self._call(work, deadline)
            runnable.append(work)
        if not runnable:
            return
        started = time.perf_counter()
        try:
            if self.fn.handle is not None:
                await self._invoke_one(runnable[0])
            else:
                await self._invoke_batch(runnable)
        finally:
            self._m_seconds.observe(time.perf_counter() - started)
            for work in runnable:
                assert work.call is not None
                work.call.finish()

    async def _invoke_one(self, work: _Work) -> None:
        assert self.fn.handle is not None and work.event is not None and work.call is not None
        limit = asyncio.timeout(self.spec.timeout)
        try:
            async with limit:
                work.result = await self.fn.handle(work.event, self.ctx, work.call)
        except TimeoutError as exc:  # ours, or one from a dependency (nats-py's subclass it)
            work.result = self._late("handler") if limit.expired() else exc
        except Exception as exc:
            work.result = exc

    async def _invoke_batch(self, works: list[_Work]) -> None:
        assert self.fn.handle_batch is not None
        events = [w.event for w in works if w.event is not None]
        calls = [w.call for w in works if w.call is not None]
        results: Sequence[Sequence[Emit] | BaseException]
        limit = asyncio.timeout(self.spec.timeout)
        try:
            async with limit:
                results = await self.fn.handle_batch(events, self.ctx, calls)
            if len(results) != len(works):
                raise RuntimeError(
                    f"batch handler returned {len(results)} results for {len(works)} events"
                )
        except TimeoutError as exc:
            results = [self._late("batch handler") if limit.expired() else exc] * len(works)
        except Exception as exc:
            results = [exc] * len(works)
        for work, result in zip(works, results, strict=True):
            work.result = result

    def _late(self, what: str) -> Retry:
        return Retry(f"the {what} ran past its {self.spec.timeout:g} s timeout")

    def _cancel_reason(self, work: _Work) -> str | None:
        """Why the work's job (or image) was cancelled, or None if it was not."""
        if work.call is not None and work.call.cancelled:
            return work.call.cancel_reason or "cancelled"
        return self._flag(work.event) if work.event is not None else None

    def _flag(self, event: Event) -> str | None:
        """Why ``event``'s job (or image) was cancelled, for a function whose work a cancel
        stops; None otherwise (see ``Spec.cancellable``)."""
        return self.ctx.cancels.reason(event) if self.spec.cancellable else None

    def _cancel_flagged(self, target: str, flag: CancelFlag) -> None:
        """A cancel flag appeared: tell every running call it names."""
        if not self.spec.cancellable:
            return
        for work in self._active.values():
            if work.call is not None and work.event is not None and target in targets(work.event):
                work.call.cancel(flag.reason)

    async def _settle_forever(self) -> None:
        while True:
            await self._settle_wanted.wait()
            self._settle_wanted.clear()
            while self._to_settle:
                group, self._to_settle = self._to_settle, []
                try:
                    await self._settle_group(group)
                except Exception:
                    log.exception("%s: could not settle %d message(s)", self.stage, len(group))
                finally:
                    for work in group:
                        self._active.pop(id(work.msg), None)
                    self._release(group)
            self._settled.set()

    async def _settle_group(self, group: list[_Work]) -> None:
        """Publish every finished invocation's events, await all PubAcks, then ack each."""
        published: list[tuple[_Work, list[asyncio.Future[None]]]] = []
        failed: list[tuple[_Work, BaseException]] = []
        for work in group:
            assert work.event is not None
            if isinstance(work.result, BaseException) and not isinstance(work.result, Cancelled):
                # A handler that failed (or timed out) after its job was cancelled: the
                # cancellation is the outcome, not the failure.
                reason = self._cancel_reason(work)
                if reason is not None:
                    work.result = Cancelled(reason)
            try:
                if isinstance(work.result, Cancelled):
                    cancelled = self._cancelled_event(work.event, work.result.reason)
                    futures = [await self._send(cancelled)]
                elif isinstance(work.result, BaseException):
                    failed.append((work, work.result))
                    continue
                else:
                    futures = await self._publish(work.event, work.result or ())
            except Exception as exc:
                failed.append((work, exc))
                continue
            published.append((work, futures))
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                for _, futures in published:
                    for future in futures:
                        with contextlib.suppress(Exception):
                            await future  # errors are read per message below
        except TimeoutError:
            for _, futures in published:
                for future in futures:
                    future.cancel()
        for work, futures in published:
            assert work.event is not None
            error = _first_error(futures)
            if error is not None:
                failed.append((work, error))
                continue
            try:
                await work.msg.ack()
            except Exception:
                log.exception("%s: could not ack %s", self.stage, work.event.id)
                continue
            if isinstance(work.result, Cancelled):
                self._m_outcome["cancelled"].inc()
                log.info("%s: cancelled %s (%s)", self.stage, work.event.id, work.result.reason)
            else:
                self._m_outcome["ok"].inc()
                log.debug("%s: done %s", self.stage, work.event.id)
        # Failures last: dead-lettering takes round trips the successes need not wait for.
        for work, error in failed:
            assert work.event is not None
            await self._guarded(self._fail(work.msg, work.event, error))

    async def _fail(self, msg: Msg, event: Event, exc: BaseException) -> None:
        if isinstance(exc, Reject):
            await self._dead_letter(msg, event, exc.reason, "rejected")
        else:
            await self._retry_or_give_up(msg, event, exc)

    async def _retry_or_give_up(self, msg: Msg, event: Event, exc: BaseException) -> None:
        delivered = msg.metadata.num_delivered or 1
        reason = _describe(exc)
        if delivered >= self.spec.max_deliver:
            if self._flag(event) is not None:
                # Cancelled, and even announcing that failed: not a failure to dead-letter.
                log.warning("%s: dropping cancelled %s (%s)", self.stage, event.id, reason)
                await msg.term()
                return
            await self._dead_letter(
                msg, event, f"gave up after {delivered} attempts: {reason}", "exhausted"
            )
            return
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
        if delay is None:
            delay = self.spec.retry_delay(delivered)
        if isinstance(exc, Retry):
            log.info("%s: retry %s in %.1fs (%s)", self.stage, event.id, delay, reason)
        else:
            log.warning(
                "%s: attempt %d/%d for %s failed, retrying in %.1fs",
                self.stage,
                delivered,
                self.spec.max_deliver,
                event.id,
                delay,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        await msg.nak(delay=delay)
        self._m_outcome["retry"].inc()

    # --- publishing ------------------------------------------------------------------------
    def build_event(self, parent: Event, emit: Emit, index: int) -> Event:
        if emit.topic not in self.spec.emits:
            raise RuntimeError(
                f"function {self.stage!r} emitted {emit.topic!r}, not in its Spec.emits "
                f"{self.spec.emits}"
            )
        image_id = emit.image_id or parent.image_id
        job_id = emit.job_id or parent.job_id
        return Event(
            id=emit.event_id or derive_id(parent.id, self.stage, emit.topic, index),
            type=emit.topic,
            source=f"darkroom/{self.stage}",
            time=now_iso(),
            subject=image_id or job_id or "",
            object=emit.object,
            image_id=image_id,
            job_id=job_id,
            causation_id=parent.id,
            data=emit.data,
        )

    def _cancelled_event(self, parent: Event, reason: str) -> Event:
        return Event(
            id=derive_id(parent.id, self.stage, CANCELLED),
            type=f"{CANCELLED}.{self.stage}",
            source=f"darkroom/{self.stage}",
            time=now_iso(),
            subject=parent.job_id or parent.image_id or "",
            image_id=parent.image_id,
            job_id=parent.job_id,
            causation_id=parent.id,
            data={"stage": self.stage, "reason": reason},
        )

    async def _publish(self, parent: Event, emits: Sequence[Emit]) -> list[asyncio.Future[None]]:
        """Send ``emits``; the returned futures resolve once the stream stored them."""
        return [
            await self._send(self.build_event(parent, emit, index))
            for index, emit in enumerate(emits)
        ]

    async def _send(self, event: Event) -> asyncio.Future[None]:
        subject = self._names.subject(event.type)
        return await self._publisher.publish(subject, event.encode(), event.id)

    # --- dead letters ----------------------------------------------------------------------
    async def _dead_letter(
        self,
        msg: Msg | None,
        event: Event | None,
        reason: str,
        kind: str,
        *,
        stream_seq: int | None = None,
        deliveries: int | None = None,
        subject: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Record why an event failed, announce ``failed.<stage>``, and term the message."""
        if msg is not None:
            stream_seq = msg.metadata.sequence.stream
            deliveries = msg.metadata.num_delivered
            subject = msg.subject
            payload = msg.data
        log.warning(
            "%s: dead-lettering stream seq %s (%s): %s", self.stage, stream_seq, kind, reason
        )
        record: dict[str, Any] = {
            "stage": self.stage,
            "kind": kind,
            "reason": reason,
            "stream_seq": stream_seq,
            "deliveries": deliveries,
            "subject": subject,
            "time": now_iso(),
            "event_id": event.id if event else None,
            "image_id": event.image_id if event else None,
            "job_id": event.job_id if event else None,
        }
        if event is None and payload is not None:
            record["payload_b64"] = base64.b64encode(payload[:MAX_DLQ_PAYLOAD]).decode()
            record["payload_truncated"] = len(payload) > MAX_DLQ_PAYLOAD
        elif event is not None:
            record["event"] = orjson.loads(event.encode())
        js = self.ctx.js
        await js.publish(
            self._names.dead_letter(self.stage),
            orjson.dumps(record),
            headers={"Nats-Msg-Id": f"dlq-{self.stage}-{stream_seq}"},
        )
        # The stream sequence is in the id: a retried event (the same event id, published
        # again) that fails again is a new failure, not a duplicate of the first.
        failed = Event(
            id=derive_id(f"{event.id if event else ''}@{stream_seq}", self.stage, "failed"),
            type=f"failed.{self.stage}",
            source=f"darkroom/{self.stage}",
            time=now_iso(),
            subject=(event.image_id or event.job_id or "") if event else "",
            image_id=event.image_id if event else None,
            job_id=event.job_id if event else None,
            causation_id=event.id if event else None,
            data={"stage": self.stage, "kind": kind, "reason": reason, "stream_seq": stream_seq},
        )
        await js.publish(
            self._names.failed(self.stage), failed.encode(), headers={"Nats-Msg-Id": failed.id}
        )
        self._m_outcome["dead_lettered"].inc()
        if msg is not None:
            await msg.term()

    def _accept_exhausted(self, advisory: Msg, source: PullConsumer) -> None:
        task = asyncio.create_task(self._on_exhausted(advisory, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_exhausted(self, advisory: Msg, source: PullConsumer) -> None:
        try:
            info = orjson.loads(advisory.data)
            seq = int(info["stream_seq"])
            try:
                stored = await self.ctx.js.get_msg(self._names.stream, seq)
            except nats.js.errors.NotFoundError:
                await advisory.ack()  # aged out of the stream: nothing left to record
                return
            try:
                event: Event | None = decode(stored.data or b"")
            except EnvelopeError:
                event = None
            reason = self._flag(event) if event is not None else None
            if event is not None and reason is not None:
                # Its job was cancelled: that is the outcome, whatever kept it from an ack.
                cancelled = self._cancelled_event(event, reason)
                await self.ctx.js.publish(
                    self._names.subject(cancelled.type),
                    cancelled.encode(),
                    headers={"Nats-Msg-Id": cancelled.id},
                )
                await advisory.ack()
                return
            await self._dead_letter(
                None,
                event,
                f"no attempt finished within ack_wait ({self.spec.ack_wait:g} s) in "
                f"{info.get('deliveries')} deliveries: the worker crashed or hung",
                "timeout",
                stream_seq=seq,
                deliveries=info.get("deliveries"),
                subject=stored.subject,
                payload=stored.data,
            )
            await advisory.ack()
        except Exception:
            log.exception("%s: could not dead-letter an exhausted event; will retry", self.stage)
            with contextlib.suppress(Exception):
                await advisory.nak(delay=5.0)
        finally:
            source.release()

    # --- heartbeats ------------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        interval = heartbeat_interval(self.spec.ack_wait)
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for work in list(self._active.values()):
                if now - work.started >= interval * (work.beats + 1):
                    work.beats += 1
                    with contextlib.suppress(Exception):
                        await work.msg.in_progress()


def _describe(exc: BaseException) -> str:
    """A failure in a few words, for logs and dead-letter records.

    nats-py's errors are named as such: its ``TimeoutError`` subclasses the builtin one, so
    "TimeoutError" alone would read like the runner's own deadline.
    """
    if isinstance(exc, Retry):
        return exc.reason
    name = type(exc).__name__
    if type(exc).__module__.split(".")[0] == "nats":
        name = f"NATS {name}"
    text = str(exc)
    return f"{name}: {text}" if text else name


def heartbeat_interval(ack_wait: float) -> float:
    """How often a held message is told to stay in progress: three times per ack_wait."""
    return max(0.5, ack_wait / 3)


def _first_error(futures: list[asyncio.Future[None]]) -> BaseException | None:
    for future in futures:
        if future.cancelled():
            return TimeoutError(f"no PubAck within {PUBLISH_TIMEOUT_S:.0f} s")
        if future.exception() is not None:
            return future.exception()
    return None
