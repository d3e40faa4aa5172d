"""A retried event that fails again is announced again (``failed.<stage>``), even within
the stream's duplicate window: the failure's id carries the delivery's stream sequence."""

from __future__ import annotations

from typing import Any

import pytest

from bus import Call, Context, Emit, Event, Function, Reject, Spec
from bus.core.envelope import new_id, now_iso
from tests.support.streams import dead_letters, events, settled

pytestmark = [pytest.mark.nats]


def refusing() -> Function:
    async def handle(event: Event, _: Context, call: Call) -> list[Emit]:
        raise Reject("never")

    return Function(Spec("refuser", listens=("refuse",)), handle=handle)


async def test_a_retried_event_that_fails_again_is_announced_again(
    ctx: Context, run_function: Any
) -> None:
    await run_function(refusing())
    event = Event(id=f"refuse-{new_id()}", type="refuse", source="test", time=now_iso())
    subject = ctx.names.subject(event.type)
    await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id})
    (first,) = await events(ctx, "failed.refuser", at_least=1)
    # A retry as the dead-letter API does it: the same event, a new message id.
    await ctx.js.publish(subject, event.encode(), headers={"Nats-Msg-Id": f"{event.id}-retry"})
    await settled(ctx, "refuser")
    records = await dead_letters(ctx, "refuser", at_least=2)
    failures = await events(ctx, "failed.refuser", at_least=2)
    assert [r["event_id"] for r in records] == [event.id, event.id]
    assert [f.causation_id for f in failures] == [event.id, event.id]
    assert failures[0].id == first.id and failures[1].id != first.id
    assert [f.data["stream_seq"] for f in failures] == [r["stream_seq"] for r in records]
