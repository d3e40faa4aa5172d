"""The function contract: a module with ``SPEC`` and ``async def handle(event, ctx)``.

A handler stores its outputs, then returns the events to fire (:class:`Emit`). The runner
publishes them with ids derived from the input event and acks the input only after every
PubAck came back, so a crash at any point replays safely.

Functions are discovered through the ``darkroom.functions`` entry-point group only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bus.envelope import Event, ObjectRef

if TYPE_CHECKING:
    from bus.context import Context
    from bus.settings import Settings

ENTRY_POINT_GROUP = "darkroom.functions"


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


@dataclass(frozen=True, slots=True)
class Spec:
    """How the bus runs a function; read the four Specs to see the whole chain."""

    name: str
    listens: tuple[str, ...]  # topics, e.g. ("uploaded",)
    emits: tuple[str, ...] = ()
    batch: int = 1  # >1: handle() receives a list of events and returns one result each
    concurrency: int = 8  # handler invocations in flight per process
    ack_wait: float = 30.0  # seconds; heartbeats keep long work alive
    max_deliver: int = 5
    backoff: tuple[float, ...] = (1.0, 5.0, 30.0)  # delay before retry n (last one repeats)
    timeout: float = 600.0  # longest a handler may run; heartbeats keep it alive till then
    needs_gpu: bool = False

    def __post_init__(self) -> None:
        if not self.listens:
            raise ValueError(f"function {self.name!r} listens to nothing")
        if self.batch < 1 or self.concurrency < 1:
            raise ValueError(f"function {self.name!r}: batch and concurrency must be >= 1")
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


HandlerResult = Sequence[Emit]
SingleHandler = Callable[[Event, "Context"], Awaitable[HandlerResult]]
BatchHandler = Callable[[list[Event], "Context"], Awaitable[Sequence[HandlerResult | Exception]]]


@dataclass(frozen=True, slots=True)
class Function:
    """A loaded function module.

    ``decode_event`` is optional: a function fed by foreign payloads (MinIO notifications)
    turns them into an :class:`Event` there, returning None for darkroom's own envelope.
    """

    spec: Spec
    handle: Callable[..., Awaitable[Any]]
    module: str
    decode_event: Callable[[bytes], Event | None] | None = None

    @classmethod
    def from_module(cls, module: ModuleType) -> Function:
        spec = getattr(module, "SPEC", None)
        handle = getattr(module, "handle", None)
        if not isinstance(spec, Spec) or not callable(handle):
            raise TypeError(f"{module.__name__} must define SPEC (a Spec) and handle()")
        return cls(spec, handle, module.__name__, getattr(module, "decode_event", None))


class UnknownFunctionError(LookupError):
    pass


def discover() -> dict[str, Function]:
    """All functions registered in the ``darkroom.functions`` entry-point group."""
    found: dict[str, Function] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        fn = Function.from_module(ep.load())
        if fn.spec.name != ep.name:
            raise TypeError(f"entry point {ep.name!r} names a function called {fn.spec.name!r}")
        found[ep.name] = fn
    return found


def load(name: str) -> Function:
    """One registered function by name, without importing the others.

    A dotted name (``mypkg.myfunction``) imports that module directly: handy while
    developing a function, before it is packaged with an entry point.
    """
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        return Function.from_module(ep.load())
    if "." in name:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise UnknownFunctionError(f"cannot import function module {name!r}: {exc}") from None
        return Function.from_module(module)
    raise UnknownFunctionError(
        f"no function named {name!r}; registered: {', '.join(registered_names())}"
    )


def registered_names() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def enabled_names(settings: Settings) -> list[str]:
    """Registered functions not disabled in the settings."""
    return [name for name in registered_names() if settings.function(name).enabled]
