"""Waiting for a moment on the wall clock, the clock the lease ledger keeps its times in."""

from __future__ import annotations

import asyncio
import time


async def past(moment: float) -> None:
    """Return once ``time.time()`` is past ``moment`` (epoch seconds)."""
    while True:
        left = moment - time.time()
        if left < 0:
            return
        # asyncio sleeps on the monotonic clock: look at the wall clock again after.
        await asyncio.sleep(left + 0.01)
