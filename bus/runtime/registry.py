"""Functions: a :class:`Spec` bound to its handler, found through entry points.

A function module builds one :class:`Function` and names it ``FUNCTION``::

    SPEC = Spec(name="ingest", listens=("uploaded",), emits=("ingested",))

    async def handle(event: Event, ctx: Context, call: Call) -> list[Emit]: ...

    FUNCTION = Function(SPEC, handle=handle)

Binding the handler here is what lets mypy check its signature. Functions are registered
in the ``darkroom.functions`` entry-point group (``name = "package.module:FUNCTION"``), the
only way the bus finds them; a third-party package adds one the same way.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from bus.core.contract import Emit, Model, Spec
from bus.core.envelope import Event
from bus.core.settings import Settings
from bus.core.subjects import is_safe_id
from bus.runtime.call import Call
from bus.runtime.context import Context

ENTRY_POINT_GROUP = "darkroom.functions"
ATTRIBUTE = "FUNCTION"

Handler = Callable[[Event, Context, Call], Awaitable[Sequence[Emit]]]
"""One event in, the events to fire out."""

BatchHandler = Callable[
    [list[Event], Context, list[Call]], Awaitable[Sequence[Sequence[Emit] | BaseException]]
]
"""Up to ``Spec.batch`` events in (``calls[i]`` belongs to ``events[i]``), one result per
event out: its emits, or the exception it failed with (that event alone fails)."""

Setup = Callable[[Context], Awaitable[Any]]
"""Runs once, before anything is fetched. What it returns is the function's *state* (its
models, a vocabulary...): every invocation gets it as ``call.state``, and so do
``prepare``, ``models`` and the services. A failed setup fails the start."""

Prepare = Callable[[Context, Any], Awaitable[None]]
"""Long preparation after setup (downloading model weights): it runs in the background, so
the process comes up at once, and the function fetches no event and answers no service
request until it has finished. A failure is logged and it is tried again, with backoff."""

Teardown = Callable[[Context, Any], Awaitable[None]]
"""Runs once the runner stopped (after the last event is settled, or cut short by a drain
timeout), with the state setup returned."""

ModelsOf = Callable[[Any], Sequence[Model]]
"""The Models a GPU function loads, given its state: preloaded in ``high`` mode."""

Service = Callable[[Msg, Context, Any], Awaitable[None]]
"""A request-reply endpoint a function serves next to its events (``<ns>-rpc.<name>``,
shared by its workers as a queue group): the message, the context and the function's
state in; it answers through :mod:`bus.runtime.services`."""


@dataclass(frozen=True, slots=True)
class Affinity:
    """Model affinity across workers, for a GPU function whose events each need one model.

    Whoever publishes an event of ``topic`` that names a model publishes it on
    ``<ns>.<topic>.<key>`` (:func:`bus.runtime.streams.keyed_subject`), one key per model;
    an event naming none stays on ``<ns>.<topic>``, the function's own consumer, which every
    worker serves at once. Each key has a durable consumer of its own with a JetStream
    priority group (the ``prioritized`` policy), and every worker keeps a pull request open
    on every key's while it has room, at a priority (the server serves the lowest first):

    0. it holds the key's model (it has a lease for it);
    1. it holds no model (it is idle: a load evicts nothing);
    2. it holds (or is loading) another model, and nobody holds this one;
    3. it holds another model, and another worker holds this one (the VRAM lease ledger,
       read every few seconds, says).

    So a holder wins its model's jobs while it has room for more; others take them once
    the holders are full (a worker asks for at most a few batches ahead), and a dead
    holder's jobs go to the others at once (its requests died with it). Nothing waits
    while any worker has room. A worker renews its open requests when their priority
    changes (:meth:`bus.runtime.pull.PullConsumer.reconsider`).

    ``keys``: every key (model) there may be, from the settings; ``model``: the lease
    model name of a key.
    """

    topic: str
    keys: Callable[[Settings], Sequence[str]]
    model: Callable[[str], str]


@dataclass(frozen=True, slots=True)
class Function:
    """A function: its Spec, exactly one of ``handle``/``handle_batch``, and optional hooks.

    ``setup``/``prepare``/``teardown`` are its lifespan (see :data:`Setup`); ``models``
    names what it loads under VRAM leases; ``services`` are request-reply endpoints by name
    (e.g. the caption function embeds search queries for the gateway).

    ``decode_event`` is for functions fed by foreign payloads (MinIO notifications): it
    turns one into an :class:`Event`, or returns None for darkroom's own envelope.
    ``intake`` marks a function that accepts uploads (it announces ``uploaded`` and uses
    the digests), so it runs with the gateway's NATS role rather than a worker's.
    ``affinity`` routes its events by the model they need (see :class:`Affinity`).
    """

    spec: Spec
    handle: Handler | None = None
    handle_batch: BatchHandler | None = None
    setup: Setup | None = None
    prepare: Prepare | None = None
    teardown: Teardown | None = None
    models: ModelsOf | None = None
    services: Mapping[str, Service] = field(default_factory=dict)
    decode_event: Callable[[bytes], Event | None] | None = None
    intake: bool = False
    affinity: Affinity | None = None

    def __post_init__(self) -> None:
        name = self.spec.name
        if (self.handle is None) == (self.handle_batch is None):
            raise TypeError(f"function {name!r} needs exactly one of handle and handle_batch")
        if self.handle is not None and self.spec.batch != 1:
            raise TypeError(
                f"function {name!r} has Spec.batch={self.spec.batch}: give it handle_batch"
            )
        if (self.models is not None or self.affinity is not None) and not self.spec.needs_gpu:
            raise TypeError(f"function {name!r} declares models, so its Spec needs_gpu")
        if self.affinity is not None and self.affinity.topic not in self.spec.listens:
            raise TypeError(f"function {name!r}: affinity's topic is not one it listens to")
        for service in self.services:
            if not is_safe_id(service):
                raise TypeError(f"function {name!r}: service name {service!r} is not a safe id")

    @property
    def module(self) -> str:
        """Where the handler is defined (for logs and `darkroom functions`)."""
        handler = self.handle or self.handle_batch
        return str(getattr(handler, "__module__", "?"))


class UnknownFunctionError(LookupError):
    pass


def _checked(obj: object, where: str) -> Function:
    if not isinstance(obj, Function):
        raise TypeError(f"{where} must be a bus.Function, got {type(obj).__name__}")
    return obj


def discover() -> dict[str, Function]:
    """All functions registered in the ``darkroom.functions`` entry-point group."""
    found: dict[str, Function] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        fn = _checked(ep.load(), f"entry point {ep.name!r} ({ep.value})")
        if fn.spec.name != ep.name:
            raise TypeError(f"entry point {ep.name!r} names a function called {fn.spec.name!r}")
        found[ep.name] = fn
    return found


def load(name: str) -> Function:
    """One registered function by name, without importing the others.

    A module path (``mypkg.myfunction``, or ``mypkg.myfunction:OBJECT``) imports that
    module and takes its ``FUNCTION`` (or the object named): handy while developing a
    function, before it is packaged with an entry point.
    """
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        return _checked(ep.load(), f"entry point {name!r} ({ep.value})")
    if "." in name or ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownFunctionError(f"cannot import function module {name!r}: {exc}") from None
        attribute = attribute or ATTRIBUTE
        if not hasattr(module, attribute):
            raise UnknownFunctionError(f"module {module_name!r} defines no {attribute}")
        return _checked(getattr(module, attribute), f"{module_name}:{attribute}")
    raise UnknownFunctionError(
        f"no function named {name!r}; registered: {', '.join(registered_names())}"
    )


def registered_names() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def enabled_names(settings: Settings) -> list[str]:
    """Registered functions not disabled in the settings."""
    return [name for name in registered_names() if settings.function(name).enabled]
