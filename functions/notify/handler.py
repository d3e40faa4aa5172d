"""notify: keep the catalogue (the PostgreSQL read model) current from every lifecycle event:
images from theirs (approval decisions and deletions included), generation jobs from theirs
(requested, generated, and a job's failure or cancellation).

While the database is unreachable the handler waits for it (the runner's heartbeats keep
the event alive) rather than spending its retries, so an outage of up to ``Spec.timeout``
per attempt loses nothing and dead-letters nothing.
"""

from __future__ import annotations

import asyncio

from bus import Call, Context, Emit, Event, Function, Reject, Retry, Spec, subjects
from bus.infra.postgres import CONNECTION_ERRORS
from bus.state.readmodel import ReadModelError

SPEC = Spec(
    name="notify",
    listens=(
        subjects.UPLOADED,
        subjects.REQUESTED,
        f"{subjects.REQUESTED}.>",  # a job naming a model (model affinity)
        subjects.GENERATED,
        subjects.INGESTED,
        subjects.CAPTIONED,
        subjects.APPROVED,  # decisions, and the sweep's deletions (bus/state/approvals.py)
        subjects.REJECTED,
        subjects.DELETED,
        f"{subjects.FAILED}.>",
        # Only the job stage's: a cancel of notify's own would come back to it, and loop.
        f"{subjects.CANCELLED}.generate",
    ),
    concurrency=16,
    ack_wait=10.0,
    max_deliver=10,
    backoff=(0.5, 2.0, 10.0),
    needs_db=True,
    cancellable=False,  # it records cancels (and all else) about a job
)
WAIT_STEP_S = (0.2, 0.5, 1.0, 2.0, 5.0)


async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]:
    if event.type == f"{subjects.FAILED}.{SPEC.name}":
        return []  # projecting our own failure would fail the same way, and loop
    if event.type.startswith((subjects.FAILED + ".", subjects.CANCELLED + ".")):
        if not event.image_id and not event.job_id:
            return []  # about no image and no job (e.g. an unreadable event): nothing to show
    elif event.type == subjects.REQUESTED:
        if not event.job_id:
            raise Reject(f"a {event.type} event needs 'job_id'")
    elif not event.image_id:
        raise Reject(f"a {event.type} event needs 'image_id'")
    if ctx.db is None:
        raise Reject("notify runs without a database (open_context(database=True))")
    waited = 0
    while True:
        try:
            await ctx.db.project(event, call.stream_seq)
            return []
        except ReadModelError as exc:
            raise Reject(str(exc)) from None
        except CONNECTION_ERRORS as exc:
            pause = WAIT_STEP_S[min(waited, len(WAIT_STEP_S) - 1)]
            if call.remaining_s() < pause + 5:
                raise Retry(f"the database is unavailable: {type(exc).__name__}: {exc}") from None
            if waited == 0:
                call.log.warning("database unavailable (%s); waiting for it", exc)
            waited += 1
            await asyncio.sleep(pause)


FUNCTION = Function(SPEC, handle=handle)
