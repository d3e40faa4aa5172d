"""MinIO bucket notifications (Records payloads) fire the chain like a gateway upload."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

import orjson
import pytest

from bus import subjects
from bus.context import Context
from bus.envelope import new_id
from bus.function import load
from tests.support.images import jpeg
from tests.support.streams import dead_letters, events, eventually

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


async def test_a_direct_bucket_upload_runs_the_chain_once(ctx: Context, run_function: Any) -> None:
    for name in ("s3events", "ingest"):
        await run_function(load(name))
    image_id = new_id()
    key = f"uploads/{image_id}/beach day.jpg"
    data = jpeg()
    await ctx.store.put_bytes(key, data, "image/jpeg")
    notification = payload(
        ctx.store.bucket,
        minio_record(ctx.store.bucket, key, len(data)),
        minio_record(
            ctx.store.bucket, f"images/{image_id}/thumb-256.webp", 10
        ),  # our own output: ignored
        minio_record("another-bucket", f"uploads/{new_id()}/x.jpg", 10),  # not ours: ignored
        minio_record(ctx.store.bucket, key, len(data), event="s3:ObjectRemoved:Delete"),
    )
    subject = ctx.names.subject(subjects.S3_EVENTS)
    await ctx.js.publish(subject, notification)
    await ctx.js.publish(subject, notification)  # MinIO may deliver twice
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.id == f"uploaded-{image_id}" and uploaded.image_id == image_id
    assert uploaded.object is not None and uploaded.object.key == key
    assert uploaded.data["source"] == "s3-notification"
    [ingested] = await events(ctx, subjects.INGESTED, at_least=1)
    assert ingested.image_id == image_id and ingested.data["width"] == 320


async def test_a_malformed_notification_is_dead_lettered(ctx: Context, run_function: Any) -> None:
    await run_function(load("s3events"))
    await ctx.js.publish(ctx.names.subject(subjects.S3_EVENTS), orjson.dumps({"Records": "nope"}))
    [record] = await dead_letters(ctx, "s3events", at_least=1)
    assert record["kind"] == "rejected" and "'Records' must be a list" in record["reason"]


async def test_the_topic_is_configurable(ctx: Context, run_function: Any) -> None:
    from bus.settings import FunctionSettings

    ctx.settings = ctx.settings.model_copy(
        update={"functions": {"s3events": FunctionSettings(listens=("minio.events",))}}
    )
    await run_function(load("s3events"))
    image_id = new_id()
    key = f"uploads/{image_id}/a.jpg"
    await ctx.store.put_bytes(key, jpeg(), "image/jpeg")
    await ctx.js.publish(
        ctx.names.subject("minio.events"),
        payload(ctx.store.bucket, minio_record(ctx.store.bucket, key, 5)),
    )
    [uploaded] = await events(ctx, subjects.UPLOADED, at_least=1)
    assert uploaded.image_id == image_id

    async def not_on_default() -> bool:
        info = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("s3events"))
        return info.config.filter_subjects == [ctx.names.subject("minio.events")]

    await eventually(not_on_default, what="consumer filtered on the configured topic")
