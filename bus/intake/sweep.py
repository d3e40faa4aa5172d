"""Sweeping what uploads leave behind, so nothing stays half-way for good.

- ``incoming/`` objects (presigned POSTs) older than ``incoming_max_age_s`` were never
  completed: deleted. So is one whose id was completed already: its form was used again.
- Every original the intake stores is staged first (a marker in the digests bucket, see
  :mod:`bus.intake.accept`), and the marker goes once it is announced or deleted. A marker
  older than ``pending_claim_s`` belongs to an upload that died or failed half-way (a crash,
  a NATS blip, a stalled store). If its image was announced after all, its claim is marked
  "published"; if not, the original is deleted and its claim, still pending, released, so
  the same bytes can be uploaded afresh.

Ages come from the store's and the marker's clocks against ``now``, which the caller
passes. Each step re-checks what it changes (compare-and-set), so sweepers in several
gateways, and uploads of the same bytes meanwhile, do not trip over each other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import nats.js.errors
import orjson

from bus.core import subjects
from bus.intake.accept import (
    Staged,
    announced,
    release_claim,
    settle_claim,
    staged_originals,
    unstage,
)
from bus.runtime.context import Context


@dataclass(slots=True)
class SweepReport:
    """What one sweep did."""

    incoming_deleted: int = 0  # presigned uploads never completed, or completed before
    settled: int = 0  # announced after all: the claim now reads "published"
    abandoned: int = 0  # never announced: the original (if stored) and its claim removed
    skipped: int = 0  # changed while we looked: left for the next sweep

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
            await _resolve(ctx, staged, staged.image_id in done, report)
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
    completed: dict[str, bool] = {}

    async def was_completed(image_id: str | None) -> bool:
        if image_id is None:
            return False
        if image_id not in completed:
            prefix = f"{subjects.UPLOADS_PREFIX}{image_id}/"
            completed[image_id] = bool(await ctx.store.list_keys(prefix))
        return completed[image_id]

    for key, modified in (await ctx.store.list_modified(subjects.INCOMING_PREFIX)).items():
        image_id = subjects.image_id_from_key(key, subjects.INCOMING_PREFIX)
        if now - modified.timestamp() > max_age or await was_completed(image_id):
            await ctx.store.delete(key)
            report.incoming_deleted += 1


async def _resolve(ctx: Context, staged: Staged, was_announced: bool, report: SweepReport) -> None:
    """Settle one abandoned staged original (see the module's docstring)."""
    try:
        entry = await ctx.digests.get(staged.sha256)
        claim, value = orjson.loads(entry.value or b"{}"), entry.value
    except nats.js.errors.KeyNotFoundError:
        claim, value = {}, None
    ours = claim.get("image_id") == staged.image_id and claim.get("key") == staged.key
    if was_announced or (ours and claim.get("state") == "published"):
        if ours and claim.get("state") != "published":
            await settle_claim(ctx, staged.sha256, value, staged.image_id, staged.key)
        report.settled += 1
    else:
        # Never announced. A claim of ours still pending goes first, and only if nobody
        # renewed it meanwhile (a re-upload announcing this very original).
        if ours and not await release_claim(ctx, staged.sha256, staged.key, pending=value):
            report.skipped += 1
            return
        await ctx.store.delete(staged.key)
        report.abandoned += 1
    await unstage(ctx, staged.image_id)
