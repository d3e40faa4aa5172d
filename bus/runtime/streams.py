"""Streams, consumers and KV buckets, declared in one place and applied idempotently.

Every process that starts calls :func:`declare`; concurrent starts converge on the same
configuration. Existing streams keep subjects that other deployments added.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from bus.core.contract import Spec
from bus.core.settings import FunctionSettings, Settings
from bus.core.subjects import Names
from bus.models.progress import READINESS_TTL_S
from bus.state.webhooks import declare_stream as declare_webhook_queue

log = logging.getLogger("darkroom.streams")

DAY_S = 86_400.0
MIN_DUPLICATE_WINDOW_S = 120.0
MAX_ACK_PENDING = 20_000
DEPLOY_WAIT_S = 60.0  # a worker waits this long for a gateway to declare the streams


def duplicate_window(specs: Iterable[Spec]) -> float:
    """Long enough that a redelivered event's outputs dedupe against the first try."""
    gaps = [s.longest_redelivery_gap for s in specs]
    return max([MIN_DUPLICATE_WINDOW_S, *gaps])


def deployment_specs(specs: Iterable[Spec]) -> list[Spec]:
    """``specs`` and every registered function's: the gateway declares the streams for
    workers that may start elsewhere (whose roles may not), so it sizes the window for
    them all."""
    from bus.runtime.registry import load, registered_names  # it imports the Context, ours

    found = {s.name: s for s in specs}
    for name in registered_names():
        if name not in found:
            try:
                found[name] = load(name).spec
            except Exception:  # a broken plugin must not stop the gateway: its worker says why
                log.warning("function %s cannot be loaded; the duplicate window ignores it", name)
    return list(found.values())


def listen_subjects(names: Names, spec: Spec, overrides: FunctionSettings) -> list[str]:
    topics = overrides.listens if overrides.listens else spec.listens
    return [names.subject(t) for t in topics]


async def _put_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        current = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s", config.name)
        return
    existing = list(current.config.subjects or [])
    wanted = list(config.subjects or [])
    config.subjects = existing + [s for s in wanted if s not in existing]
    # Never shrink a window another deployment widened, nor drop replicas: a process
    # started with default settings must not downgrade a clustered deployment.
    config.duplicate_window = max(
        config.duplicate_window or 0.0, current.config.duplicate_window or 0.0
    )
    config.num_replicas = max(config.num_replicas or 1, current.config.num_replicas or 1)
    await js.update_stream(config)


async def declare_streams(
    js: JetStreamContext, names: Names, settings: Settings, specs: list[Spec]
) -> None:
    st = settings.stream
    await _put_stream(
        js,
        StreamConfig(
            name=names.stream,
            subjects=[names.all_events],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=st.max_age_days * DAY_S,
            max_bytes=st.max_bytes,
            num_replicas=st.replicas,
            duplicate_window=duplicate_window(deployment_specs(specs)),
            description="darkroom events: an object landed",
        ),
    )
    await _put_stream(
        js,
        StreamConfig(
            name=names.dlq_stream,
            subjects=[names.all_dead_letters],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=st.dlq_max_age_days * DAY_S,
            num_replicas=st.replicas,
            duplicate_window=MIN_DUPLICATE_WINDOW_S,
            description="darkroom dead letters: events a function rejected or gave up on",
        ),
    )
    await _put_stream(
        js,
        StreamConfig(
            name=names.advisory_stream,
            subjects=[names.all_max_deliveries_advisories],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * DAY_S,
            num_replicas=st.replicas,
            description="events that used up their deliveries, until they are dead-lettered",
        ),
    )


def _consumer_config(
    durable: str, description: str, spec: Spec, filter_subjects: list[str]
) -> ConsumerConfig:
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        description=description,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        filter_subjects=filter_subjects,
        max_ack_pending=MAX_ACK_PENDING,
        max_waiting=512,
    )


async def declare_consumer(
    js: JetStreamContext, names: Names, spec: Spec, overrides: FunctionSettings
) -> None:
    durable = names.durable(spec.name)
    subjects = listen_subjects(names, spec, overrides)
    await js.add_consumer(
        names.stream, _consumer_config(durable, f"darkroom function {spec.name}", spec, subjects)
    )
    await _declare_exhausted(js, names, spec.name)


# --- keyed consumers (model affinity) -------------------------------------------------------
AFFINITY_GROUP = "affinity"  # the priority group of every keyed consumer


def keyed_stage(stage: str, key: str) -> str:
    """The name a function's consumer of one key goes by, e.g. ``generate-sd-turbo``: its
    durable is ``<ns>_generate-sd-turbo``, its exhausted advisories those of that durable."""
    return f"{stage}-{key}"


def keyed_subject(names: Names, topic: str, key: str) -> str:
    """Where an event of ``topic`` keyed ``key`` is published: ``<ns>.<topic>.<key>``."""
    return names.subject(f"{topic}.{key}")


async def declare_keyed_consumer(
    nc: NATS, js: JetStreamContext, names: Names, spec: Spec, topic: str, key: str
) -> None:
    """The durable consumer of ``spec``'s events of ``topic`` keyed ``key``, with the
    ``prioritized`` priority policy (NATS 2.12+): the server serves the waiting pull
    requests of the highest priority first (see :mod:`bus.runtime.pull`); and its consumer
    of exhausted advisories.

    nats-py does not know the priority fields yet, so the request is sent as JSON.
    """
    stage = keyed_stage(spec.name, key)
    durable = names.durable(stage)
    config = _consumer_config(
        durable,
        f"darkroom function {spec.name}, {topic} keyed {key}",
        spec,
        [keyed_subject(names, topic, key)],
    ).as_dict()
    config["priority_groups"] = [AFFINITY_GROUP]
    config["priority_policy"] = "prioritized"
    request = orjson.dumps({"stream_name": names.stream, "config": config})
    reply = await nc.request(
        f"$JS.API.CONSUMER.CREATE.{names.stream}.{durable}", request, timeout=10.0
    )
    answer = orjson.loads(reply.data)
    if "error" in answer:
        nats.js.errors.APIError.from_error(answer["error"])  # raises it
    await _declare_exhausted(js, names, stage)


async def _declare_exhausted(js: JetStreamContext, names: Names, stage: str) -> None:
    exhausted = names.exhausted_durable(stage)
    await js.add_consumer(
        names.advisory_stream,
        ConsumerConfig(
            name=exhausted,
            durable_name=exhausted,
            description=f"darkroom function {stage}: events that used up their deliveries",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=50,
            filter_subject=names.max_deliveries_advisory(stage),
        ),
    )


async def key_value(
    js: JetStreamContext, bucket: str, replicas: int = 1, ttl: float | None = None
) -> KeyValue:
    """Open a KV bucket, creating it on first use (``ttl``: entries expire after it)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(
        bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas, ttl=ttl
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        # Created concurrently by another process.
        return await js.key_value(bucket)


class NotDeployedError(Exception):
    """The streams and buckets do not exist yet on this NATS server."""


async def check_deployed(js: JetStreamContext, settings: Settings, keys: bool = True) -> Names:
    """Names for a deployment that must already exist (for commands that only read, and
    for workers, whose NATS role may not declare streams); ``keys``: the API keys too."""
    names = Names(settings.namespace)
    try:
        await js.stream_info(names.stream)
        await js.stream_info(names.advisory_stream)
        await js.key_value(names.cancels_kv)
        await js.key_value(names.leases_kv)
        if keys:
            await js.key_value(names.keys_kv)
    except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        raise NotDeployedError(
            f"no darkroom deployment with namespace {names.namespace!r} on this NATS yet; "
            "start `darkroom up` or `darkroom gateway` first (they declare the streams)"
        ) from None
    return names


async def wait_deployed(
    js: JetStreamContext, settings: Settings, timeout: float = DEPLOY_WAIT_S
) -> Names:
    """:func:`check_deployed`, waiting up to ``timeout`` seconds for a gateway to declare
    the deployment (workers and the gateway may start in any order)."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            return await check_deployed(js, settings, keys=False)
        except NotDeployedError:
            if time.monotonic() >= deadline:
                raise
            if not said:
                log.info("waiting for a gateway to declare the streams of %r", settings.namespace)
                said = True
            await asyncio.sleep(1.0)


async def declare(
    js: JetStreamContext, settings: Settings, specs: list[Spec], streams: bool = True
) -> Names:
    """The given functions' consumers, and (with ``streams``: the gateway role's part) the
    streams and the shared KV buckets. Without it the deployment must exist, or appear
    within :data:`DEPLOY_WAIT_S`."""
    if not streams:
        names = await wait_deployed(js, settings)
        for spec in specs:
            await declare_consumer(js, names, spec, settings.function(spec.name))
        return names
    names = Names(settings.namespace)
    await declare_streams(js, names, settings, specs)
    await declare_webhook_queue(js, settings)  # workers' webhooks only look it up
    for spec in specs:
        await declare_consumer(js, names, spec, settings.function(spec.name))
    await key_value(js, names.keys_kv, settings.stream.replicas)
    await key_value(js, names.digests_kv, settings.stream.replicas)
    # A cancel flag must outlive every event it may have to skip.
    await key_value(
        js, names.cancels_kv, settings.stream.replicas, ttl=settings.stream.max_age_days * DAY_S
    )
    await key_value(js, names.leases_kv, settings.stream.replicas)
    # Model readiness by worker: a dead worker's entries lapse (live ones are rewritten).
    await key_value(js, names.models_kv, settings.stream.replicas, ttl=READINESS_TTL_S)
    return names
