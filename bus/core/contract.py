"""The function contract: what a function declares, and the ways one invocation can end.

A function is a :class:`Spec` (what it listens to, emits, and how the bus runs it) plus a
handler. The handler stores its outputs and returns the events to fire (:class:`Emit`), or
raises :class:`Retry`, :class:`Reject` or :class:`Cancelled`. The runner publishes the
events with ids derived from the input event and acks the input only after every PubAck
came back, so a crash at any point replays safely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bus.core.envelope import ObjectRef


class Retry(Exception):
    """Try this event again after ``delay`` seconds (counts against ``max_deliver``)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(Exception):
    """This event can never succeed: dead-letter it and emit ``failed.<stage>``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Cancelled(Exception):
    """Someone cancelled this work: ack it and emit ``cancelled.<stage>``.

    Not a failure: nothing is dead-lettered and no ``failed`` event is sent.
    """

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a model is being loaded: the leased device and how the mode wants it held."""

    device: str  # "cuda:1", or "cpu"
    offload: bool = False  # low mode: keep parts in CPU memory where the model supports it


@dataclass(frozen=True, slots=True)
class Model:
    """A model a GPU function uses, loaded under a VRAM lease on the worker's device.

    ``load`` is blocking (it runs on the device's own thread) and must put the model on
    ``placement.device``; ``estimate_mb`` is what the lease asks for until the footprint is
    measured after the load.
    """

    name: str
    estimate_mb: int
    load: Callable[[Placement], Any] = field(compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model needs a name")
        if self.estimate_mb < 1:
            raise ValueError(f"model {self.name!r}: estimate_mb must be >= 1")


@dataclass(frozen=True, slots=True)
class Spec:
    """How the bus runs a function; read the Specs to see the whole chain."""

    name: str
    listens: tuple[str, ...]  # topics, e.g. ("uploaded",)
    emits: tuple[str, ...] = ()
    batch: int = 1  # >1: a batch handler gets up to this many events per call
    batch_wait_s: float = 0.0  # how long a batch may wait for more after its first event
    concurrency: int = 8  # handler invocations in flight per process
    ack_wait: float = 10.0  # a killed worker's events return after this; heartbeats keep live work
    max_deliver: int = 5
    backoff: tuple[float, ...] = (1.0, 5.0, 30.0)  # delay before retry n (last one repeats)
    timeout: float = 600.0  # longest a handler may run; heartbeats keep it alive till then
    needs_gpu: bool = False
    needs_db: bool = False  # reads or writes the PostgreSQL read model (ctx.db)
    # A cancel flag on an event's job (or image) stops this function's work on it. Off for
    # functions that record or derive from work already done (notify must project the
    # cancel itself; ingest and caption process a job's outputs like any image).
    cancellable: bool = True

    def __post_init__(self) -> None:
        if not self.listens:
            raise ValueError(f"function {self.name!r} listens to nothing")
        if self.batch < 1 or self.concurrency < 1:
            raise ValueError(f"function {self.name!r}: batch and concurrency must be >= 1")
        if self.batch_wait_s < 0 or (self.batch_wait_s > 0 and self.batch == 1):
            raise ValueError(
                f"function {self.name!r}: batch_wait_s must be >= 0 and needs batch > 1, "
                f"got batch_wait_s={self.batch_wait_s} with batch={self.batch}"
            )
        if not 1 <= self.max_deliver <= 100:
            raise ValueError(f"function {self.name!r}: max_deliver must be 1-100")
        if self.ack_wait < 1:
            raise ValueError(f"function {self.name!r}: ack_wait must be at least 1 s")
        if self.timeout <= 0:
            raise ValueError(f"function {self.name!r}: timeout must be positive")

    def retry_delay(self, delivered: int) -> float:
        """Delay before the next attempt, after ``delivered`` attempts so far."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(delivered, len(self.backoff)) - 1]

    @property
    def longest_redelivery_gap(self) -> float:
        """Upper bound on the time between the first delivery and the last."""
        # A repeated publish needs an attempt that published but did not ack; the next one
        # finds its output stored and re-publishes at once, so ack_wait bounds each gap.
        waits = sum(self.retry_delay(n) for n in range(1, self.max_deliver))
        return self.ack_wait * self.max_deliver + waits


@dataclass(frozen=True, slots=True)
class Emit:
    """An event for the runner to publish once the handler returns.

    ``event_id`` and ``image_id`` default to values derived from the input event; set them
    only where an event has a natural identity of its own (an upload's image id).
    """

    topic: str
    object: ObjectRef | None = None
    data: dict[str, Any] = field(default_factory=dict)
    image_id: str | None = None
    job_id: str | None = None
    event_id: str | None = None
