"""notify: keep the image read model current from every lifecycle event."""

from __future__ import annotations

from bus import Call, Context, Emit, Event, Function, Reject, Spec, subjects
from bus.state.readmodel import project

SPEC = Spec(
    name="notify",
    listens=(
        subjects.UPLOADED,
        subjects.GENERATED,
        subjects.INGESTED,
        subjects.CAPTIONED,
        f"{subjects.FAILED}.>",
    ),
    concurrency=16,
    ack_wait=30.0,
    max_deliver=10,
    backoff=(0.5, 2.0, 10.0),
)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if event.type == f"{subjects.FAILED}.{SPEC.name}":
        return []  # projecting our own failure would fail the same way, and loop
    if not event.image_id:
        if event.type.startswith(subjects.FAILED + "."):
            return []  # a failure about no image (e.g. an unreadable event): nothing to show
        raise Reject(f"a {event.type} event needs 'image_id'")
    await project(ctx.images, event)
    return []


FUNCTION = Function(SPEC, handle=handle)
