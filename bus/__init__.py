"""darkroom's bus: the runtime every function runs on.

A function author needs only what is re-exported here::

    from bus import Call, Context, Emit, Event, Function, Reject, Spec, subjects

The sub-packages, lowest first (each imports only those below it; ``make lint`` checks):

========== ===============================================================================
core       the contract (Spec, Emit, Retry, Reject, Cancelled, Model), envelope, names,
           settings
infra      NATS connection, KV compare-and-set and mirror, object store, spool, metrics
images     accepted image types and the checks every image passes  (independent of infra)
models     the model catalogue by task (settings + profile -> a model), tiny demo models
gpu        VRAM leases and resident models          (gpu and state are independent)
state      read model, API keys, cancellation flags
runtime    context, call, registry, streams, pull consumer, publisher, runner
intake     every way bytes become an ``uploaded`` event
gateway    the HTTP API
ops        the ``darkroom`` command, process lifecycles, embedded servers, upload client
========== ===============================================================================
"""

from bus.core import subjects
from bus.core.contract import Cancelled, Emit, Model, Placement, Reject, Retry, Spec
from bus.core.envelope import Event, ObjectRef
from bus.infra.store import ObjectMissingError, TooLargeError
from bus.runtime.call import Call
from bus.runtime.context import Context
from bus.runtime.registry import Function

__all__ = [
    "Call",
    "Cancelled",
    "Context",
    "Emit",
    "Event",
    "Function",
    "Model",
    "ObjectMissingError",
    "ObjectRef",
    "Placement",
    "Reject",
    "Retry",
    "Spec",
    "TooLargeError",
    "subjects",
]
