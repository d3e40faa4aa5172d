"""MinIO bucket notifications (Records payloads): a PUT straight into ``incoming/`` is
checked, deduplicated and announced exactly like ``POST /api/uploads/{id}/complete``."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

import orjson
import pytest

from bus.core import subjects
from bus.core.envelope import new_id
from bus.runtime.context import Context
from bus.runtime.registry import load
from tests.support.images import jpeg
from tests.support.streams import dead_letters, events, settled

pytestmark = [pytest.mark.nats, pytest.mark.s3]


def minio_record(
    bucket: str, key: str, size: int, event: str = "s3:ObjectCreated:Put"
) -> dict[str, Any]:
    """The shape MinIO publishes to a NATS target (keys URL-encoded, as MinIO sends them)."""
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2026-11-22T10:00:00.000Z",
        "eventName": event,
        "userIdentity": {"principalId": "minioadmin"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": quote_plus(key),
                "size": size,
                "eTag": "abc",
                "contentType": "image/jpeg",
                "sequencer": "1",
            },
        },
    }


def payload(bucket: str, *records: dict[str, Any]) -> bytes:
    first = records[0]["s3"]["object"]["key"] if records else ""
    return orjson.dumps(
        {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{first}", "Records": list(records)}
    )


async def notify_created(ctx: Context, *keys: str, topic: str = subjects.S3_EVENTS) -> None:
    bucket = ctx.store.bucket
    records = [minio_record(bucket, key, 1) for key in keys]
    await ctx.js.publish(ctx.names.subject(topic), payload(bucket, *records))


async def test_a_direct_bucket_upload_is_checked_and_runs_the_chain_once(
    ctx: Context, run_function: Any
) -> None:
    for name in ("s3events", "ingest"):
        await run_function(load(name))
    image_id = new_id()
    key = f"incoming/{image_id}/beach day.jpg"
    data = jpeg()
    await ctx.store.put_bytes(key, data, "image/jpeg")
    bucket = ctx.store.bucket
    notification = payload(
        bucket,
        minio_record(bucket, key, len(data)),
        minio_record(bucket, f"images/{image_id}/thumb-256.webp", 10),  # our own output
        minio_record(bucket, f"uploads/{new_id()}/x.jpg", 10),  # only the intake writes there
        minio_record("another-bucket", f"incoming/{new_id()}/x.jpg", 10),  # not ours
        minio_record(bucket, key, len(data), event="s3:ObjectRemoved:Delete"),
    )
    subject = ctx.names.subject(subjects.S3_EVENTS)
    await ctx.js.publish(subject, notification)
    await ctx.js.publish(subject, notification)  # MinIO may deliver twice
    await settled(ctx, "s3events", "ingest")
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.id == f"uploaded-{image_id}" and uploaded.image_id == image_id
    assert (
        uploaded.object is not None and uploaded.object.key == f"uploads/{image_id}/beach day.jpg"
    )
    assert uploaded.data["source"] == "darkroom/s3-notification" or uploaded.source.endswith(
        "s3-notification"
    )
    [ingested] = await events(ctx, subjects.INGESTED, at_least=1)
    assert ingested.image_id == image_id and ingested.data["width"] == 320
    assert await ctx.store.list_keys("incoming/") == []
    assert await dead_letters(ctx, "s3events") == []


async def test_a_direct_upload_that_is_not_an_image_is_refused_and_deleted(
    ctx: Context, run_function: Any
) -> None:
    await run_function(load("s3events"))
    image_id = new_id()
    key = f"incoming/{image_id}/notes.jpg"
    await ctx.store.put_bytes(key, b"just some text, not a picture", "image/jpeg")
    await notify_created(ctx, key)
    await settled(ctx, "s3events")
    [record] = await dead_letters(ctx, "s3events", at_least=1)
    assert record["kind"] == "rejected" and image_id in record["reason"]
    assert "refused direct upload" in record["reason"]
    assert await ctx.store.list_keys("incoming/") == []
    assert await ctx.store.list_keys("uploads/") == []
    assert await events(ctx, subjects.UPLOADED) == []


async def test_the_same_bytes_put_twice_are_one_image(ctx: Context, run_function: Any) -> None:
    await run_function(load("s3events"))
    first, second = new_id(), new_id()
    data = jpeg()
    for image_id in (first, second):
        await ctx.store.put_bytes(f"incoming/{image_id}/a.jpg", data, "image/jpeg")
    await notify_created(ctx, f"incoming/{first}/a.jpg")
    await settled(ctx, "s3events")
    await notify_created(ctx, f"incoming/{second}/a.jpg")
    await settled(ctx, "s3events")
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == first
    assert await ctx.store.list_keys("incoming/") == []
    assert await ctx.store.list_keys("uploads/") == [f"uploads/{first}/a.jpg"]


async def test_a_malformed_notification_is_dead_lettered(ctx: Context, run_function: Any) -> None:
    await run_function(load("s3events"))
    await ctx.js.publish(ctx.names.subject(subjects.S3_EVENTS), orjson.dumps({"Records": "nope"}))
    [record] = await dead_letters(ctx, "s3events", at_least=1)
    assert record["kind"] == "rejected" and "'Records' must be a list" in record["reason"]


async def test_the_topic_is_configurable(ctx: Context, run_function: Any) -> None:
    from bus.core.settings import FunctionSettings

    ctx.settings = ctx.settings.model_copy(
        update={"functions": {"s3events": FunctionSettings(listens=("minio.events",))}}
    )
    await run_function(load("s3events"))
    info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("s3events"))
    assert info.config.filter_subjects == [ctx.names.subject("minio.events")]
    image_id = new_id()
    key = f"incoming/{image_id}/a.jpg"
    await ctx.store.put_bytes(key, jpeg(), "image/jpeg")
    await notify_created(ctx, key, topic="minio.events")
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == image_id


async def test_an_id_completed_before_is_never_announced_again(
    ctx: Context, run_function: Any
) -> None:
    """A presigned form stays valid until it expires: bytes POSTed with it again after the
    notification completed it are deleted, and neither replace the original nor announce."""
    await run_function(load("s3events"))
    image_id = new_id()
    key = f"incoming/{image_id}/a.jpg"
    first = jpeg(color=(10, 20, 30))
    await ctx.store.put_bytes(key, first, "image/jpeg")
    await notify_created(ctx, key)
    await events(ctx, subjects.UPLOADED, at_least=1)  # completed
    await ctx.store.put_bytes(key, jpeg(color=(200, 20, 30)), "image/jpeg")
    # A sentinel after it in the same notification: once it is announced, the record
    # before it was handled.
    sentinel = f"incoming/{new_id()}/sentinel.jpg"
    await ctx.store.put_bytes(sentinel, jpeg(color=(0, 255, 0)), "image/jpeg")
    await notify_created(ctx, key, sentinel)
    uploaded = await events(ctx, subjects.UPLOADED, at_least=2)
    assert [e.image_id for e in uploaded] == [image_id, sentinel.split("/")[1]]
    assert await ctx.store.list_keys(f"incoming/{image_id}/") == []
    assert await ctx.store.get_bytes(f"uploads/{image_id}/a.jpg") == first
    assert await dead_letters(ctx, "s3events") == []
