"""What the benchmarks share: percentiles, JSON-friendly rounding and display, the load
average, the final JSON line."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import orjson


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0-100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rounded(value: float, digits: int = 3) -> float | None:
    """``value`` rounded for a JSON report; None when it is NaN or infinite."""
    return round(value, digits) if math.isfinite(value) else None


def shown(value: Any, unit: str = "") -> str:
    """A summary figure for people: ``n/a`` when the report has none."""
    return "n/a" if value is None else f"{value:g}{unit}"


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none): read figures next to it."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def run_and_report(benchmark: Callable[[], dict[str, Any]]) -> int:
    """Run ``benchmark`` and print its summary as the last line, one JSON object.

    Returns the exit code. A failure prints one line naming the cause, not a traceback.
    """
    try:
        summary = benchmark()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(summary).decode())
    return 0
