"""Switching generation models on workers: what the gateway and the generate function share.

``POST /api/models/<name>/load`` asks one generate worker, any of them, through the
``generate-load`` service: it loads the catalogue model under a VRAM lease now, so the
next request for it does not wait.

``POST /api/models/<name>/unload`` must reach every worker that holds the model, while a
service request reaches only one worker of its queue group. So each generate worker also
listens on a subject of its own, named after its lease holder as the VRAM ledger records
it (a random instance id: host id and pid can repeat across containers):
``<ns>-rpc.generate-unload.<instance>``, in a queue group of its own,
``<ns>.generate-<instance>`` (the worker role may subscribe under ``<ns>-rpc.>`` only in a
queue group under ``<ns>.``). The gateway reads the holders from the ledger
and asks each one on its subject: one request per holder, one answer each, and a holder
that does not answer is named as such. (Scatter-gather on one subject would leave the
gateway guessing how many answers to wait for; the ledger already says who holds what.)
"""

from __future__ import annotations

from bus.core.subjects import Names, check_id
from bus.models.catalogue import GENERATE

LOAD_SERVICE = "generate-load"
UNLOAD_SERVICE = "generate-unload"
_LEASE_PREFIX = f"{GENERATE}:"


def lease_model(name: str) -> str:
    """The model name a VRAM lease of catalogue model ``name`` carries: ``generate:<name>``
    (what :func:`functions.generate.pipelines.model_for` names its Model)."""
    return f"{_LEASE_PREFIX}{name}"


def leased_name(model: str) -> str | None:
    """The catalogue name in a lease's model name, or None for a model of another kind."""
    return model.removeprefix(_LEASE_PREFIX) if model.startswith(_LEASE_PREFIX) else None


def unload_subject(names: Names, instance: str) -> str:
    """The subject of the worker whose lease holder is ``instance``, that unloads."""
    return names.service(f"{UNLOAD_SERVICE}.{check_id(instance, 'instance id')}")


def unload_group(names: Names, instance: str) -> str:
    """That worker's queue group: its own, so the request reaches it and nobody else."""
    return names.service_group(f"{GENERATE}-{check_id(instance, 'instance id')}")
