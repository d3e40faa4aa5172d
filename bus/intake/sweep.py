"""Sweeping what uploads leave behind, so nothing stays half-way for good.

- ``incoming/`` objects (presigned POSTs) older than ``incoming_max_age_s`` were never
  completed: deleted. (A form used again after its id was completed needs nothing more:
  completing again deletes what it POSTed, and an S3 notification completes it at once.)
- Every original the intake stores is staged first (a marker in the digests bucket, see
  :mod:`bus.intake.accept`), and the marker goes once it is announced or deleted. A marker
  older than ``pending_claim_s`` belongs to an upload that died or failed half-way (a crash,
  a NATS blip, a slow or stalled store), and :func:`~bus.intake.accept.resolve_staged`
  settles it: announced after all, its claim is marked "published"; if not, and its claim
  is stale too (nobody is adopting the original), the original is deleted and its claim
  released, so the same bytes can be uploaded afresh.

A sweep costs one listing of ``incoming/`` and one read of the staged markers, plus, only
when some are stale, one pass over the stream for their events. Ages come from the store's
and the marker's clocks against ``now``, which the caller passes. Each step re-checks what
it changes (compare-and-set), so sweepers in several gateways, and uploads of the same
bytes meanwhile, do not trip over each other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bus.core import subjects
from bus.intake.accept import Outcome, announced, resolve_staged, staged_originals
from bus.runtime.context import Context


@dataclass(slots=True)
class SweepReport:
    """What one sweep did."""

    incoming_deleted: int = 0  # presigned uploads never completed
    settled: int = 0  # announced after all: the claim now reads "published"
    abandoned: int = 0  # never announced: the original (if stored) and its claim removed
    skipped: int = 0  # its claim was still held or renewed: left for a later sweep

    def __bool__(self) -> bool:
        return any((self.incoming_deleted, self.settled, self.abandoned, self.skipped))


async def sweep_once(ctx: Context, now: float) -> SweepReport:
    """Sweep ``incoming/`` and the staged originals once, as of ``now`` (epoch seconds).

    Ages come from ``ingest.incoming_max_age_s`` and ``ingest.pending_claim_s``: an upload
    is taken as abandoned exactly when a re-upload of its bytes would take it so.
    """
    limits = ctx.settings.ingest
    report = SweepReport()
    await _sweep_incoming(ctx, now, limits.incoming_max_age_s, report)
    stale = [s for s in await staged_originals(ctx) if now - s.at > limits.pending_claim_s]
    if stale:
        done = await announced(ctx, [s.image_id for s in stale], min(s.at for s in stale))
        for staged in stale:
            outcome = await resolve_staged(ctx, staged, staged.image_id in done, now)
            if outcome is Outcome.SETTLED:
                report.settled += 1
            elif outcome is Outcome.ABANDONED:
                report.abandoned += 1
            else:
                report.skipped += 1
    return report


async def run_sweeper(ctx: Context) -> None:
    """Sweep now and every ``ingest.sweep_interval_s`` until cancelled (a background task
    of the gateway). A sweep that fails is logged and tried again at the next interval."""
    interval_s = ctx.settings.ingest.sweep_interval_s
    while True:
        try:
            report = await sweep_once(ctx, time.time())
        except asyncio.CancelledError:
            raise
        except Exception:
            ctx.log.warning("sweeping uploads failed; trying again later", exc_info=True)
        else:
            if report:
                ctx.log.info("swept uploads: %s", report)
        await asyncio.sleep(interval_s)


async def _sweep_incoming(ctx: Context, now: float, max_age: float, report: SweepReport) -> None:
    for key, modified in (await ctx.store.list_modified(subjects.INCOMING_PREFIX)).items():
        if now - modified.timestamp() > max_age:
            await ctx.store.delete(key)
            report.incoming_deleted += 1
