"""GPU smoke check: do VRAM leases match what torch says the models take on a GPU?

Run with ``python -m tests.gpu.smoke_leases [--device cuda:0] [--sizes-gb 3 2]
[--tolerance 0.05]`` on a machine with CUDA and torch. Without torch or CUDA it prints
``skipped: no CUDA`` and exits 0. On a host with several GPUs, ``--device cuda:1`` checks
that a worker pinned there measures on that device (not on the current one).

It starts a nats-server in a temporary directory, finds the device the way a worker does
(:func:`bus.gpu.leases.discover_devices`: capacity from ``torch.cuda.mem_get_info``, reserve
from the ``balanced`` mode), and opens a :class:`bus.gpu.resident.ResidentModels` on a ledger
for it. Then it loads two models through the cache, each a ``torch.nn.Sequential`` of
8192x8192 fp16 ``Linear`` layers with random weights, built on the GPU, of ``--sizes-gb``
each. The estimate handed to the cache is 20% high, so the lease shown is the measured
footprint the cache resized it to, not the estimate.

Per model it prints the lease (from a ledger snapshot), the growth of
``torch.cuda.memory_allocated`` across the load and the bytes of the parameters. It then
unloads the first model and prints how the ledger's use and the allocated memory dropped.
It exits 1 if any lease, or the ledger's drop, differs from torch's figure by more than
``--tolerance`` (5%), or if the unloaded model's lease is still in the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from bus.core.contract import Model, Placement
from bus.core.settings import Settings
from bus.gpu.leases import MIB, Holder, Ledger, discover_devices
from bus.gpu.resident import ResidentModels
from bus.ops.embedded import NatsServer
from bus.runtime.streams import key_value

WIDTH = 8192  # Linear layers of WIDTH x WIDTH
ESTIMATE_FACTOR = 1.2
BUCKET = "smoke_leases"


def cuda_torch() -> Any | None:
    """torch, if it is installed and sees a CUDA device; imported only here."""
    if importlib.util.find_spec("torch") is None:
        return None
    torch = importlib.import_module("torch")
    return torch if torch.cuda.is_available() else None


def layer_bytes(torch: Any) -> int:
    itemsize: int = torch.finfo(torch.float16).bits // 8
    return (WIDTH * WIDTH + WIDTH) * itemsize  # weight and bias


def build(torch: Any, name: str, layers: int, estimate_mb: int) -> Model:
    def load(placement: Placement) -> Any:
        with torch.no_grad():
            return torch.nn.Sequential(
                *(
                    torch.nn.Linear(WIDTH, WIDTH, device=placement.device, dtype=torch.float16)
                    for _ in range(layers)
                )
            )

    return Model(name, estimate_mb, load)


def parameter_mb(model: Any) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / MIB


@dataclass
class Row:
    model: str
    estimate_mb: int
    lease_mb: int
    allocated_mb: float  # growth of torch.cuda.memory_allocated across the load
    parameter_mb: float


def off_by(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / theirs if theirs else float("inf")


async def load(torch: Any, resident: ResidentModels, ledger: Ledger, name: str, gb: float) -> Row:
    layers = max(1, round(gb * 1024**3 / layer_bytes(torch)))
    estimate = round(layers * layer_bytes(torch) * ESTIMATE_FACTOR / MIB)
    device = ledger.device.id
    before = torch.cuda.memory_allocated(device)
    model_spec = build(torch, name, layers, estimate)
    await resident.preload(model_spec)
    allocated = (torch.cuda.memory_allocated(device) - before) / MIB
    async with resident.use(model_spec) as model:
        params = parameter_mb(model)
    del model
    leases = [x for x in (await ledger.snapshot()).leases if x.model == name]
    lease_mb = leases[0].mb if leases else 0
    return Row(name, estimate, lease_mb, allocated, params)


async def check(torch: Any, device_id: str, sizes_gb: list[float], tolerance: float) -> list[str]:
    """Load, compare, unload, compare; the problems found (none: all agree)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="smoke-leases-") as tmp:
        settings = Settings(data_dir=Path(tmp), gpu={"device": device_id, "mode": "balanced"})
        (device,) = discover_devices(settings)
        name = torch.cuda.get_device_name(device_id)
        print(
            f"{device.id} ({name}): {device.capacity_mb} MB, {device.free_mb} MB free, "
            f"reserve {device.reserve_mb} MB (mode {device.mode})"
        )
        server = NatsServer(Path(tmp) / "nats", port=0)
        await server.start()
        nc = await nats.connect(server.url)
        try:
            kv = await key_value(nc.jetstream(timeout=10), BUCKET)
            async with Ledger(kv, device, Holder.here("smoke", "gpu-smoke")) as ledger:
                resident = ResidentModels(ledger, mode="balanced", idle_ttl_s=3600)
                try:
                    start = torch.cuda.memory_allocated(device_id) / MIB
                    rows = [
                        await load(torch, resident, ledger, f"model-{chr(97 + i)}", gb)
                        for i, gb in enumerate(sizes_gb)
                    ]
                    print_rows(rows)
                    for row in rows:
                        for label, theirs in (
                            ("allocated", row.allocated_mb),
                            ("parameter", row.parameter_mb),
                        ):
                            if off_by(row.lease_mb, theirs) > tolerance:
                                problems.append(
                                    f"{row.model}: lease {row.lease_mb} MB is off the "
                                    f"{label} {theirs:.0f} MB by more than {tolerance:.0%}"
                                )
                    used = (await ledger.snapshot()).used_mb
                    grown = torch.cuda.memory_allocated(device_id) / MIB - start
                    print(f"ledger in use {used} MB; torch allocated {grown:,.0f} MB since start")
                    problems += await unload(torch, resident, ledger, rows[0], tolerance)
                finally:
                    await resident.close()
        finally:
            await nc.close()
            await server.stop()
    return problems


async def unload(
    torch: Any, resident: ResidentModels, ledger: Ledger, row: Row, tolerance: float
) -> list[str]:
    device = ledger.device.id
    used = (await ledger.snapshot()).used_mb
    allocated = torch.cuda.memory_allocated(device) / MIB
    free = torch.cuda.mem_get_info(device)[0] / MIB
    await resident.unload(row.model)
    after = await ledger.snapshot()
    allocated_after = torch.cuda.memory_allocated(device) / MIB
    free_after = torch.cuda.mem_get_info(device)[0] / MIB
    lease_drop, allocated_drop = used - after.used_mb, allocated - allocated_after
    print(
        f"unload {row.model}: ledger {used} -> {after.used_mb} MB (-{lease_drop}), "
        f"allocated {allocated:,.0f} -> {allocated_after:,.0f} MB (-{allocated_drop:,.0f}), "
        f"free on the device {free:,.0f} -> {free_after:,.0f} MB (+{free_after - free:,.0f})"
    )
    problems = []
    if any(x.model == row.model for x in after.leases):
        problems.append(f"{row.model}: its lease is still in the ledger after unload")
    if off_by(lease_drop, allocated_drop) > tolerance:
        problems.append(
            f"unload {row.model}: the ledger dropped {lease_drop} MB but torch freed "
            f"{allocated_drop:,.0f} MB"
        )
    return problems


def print_rows(rows: list[Row]) -> None:
    print(
        f"{'model':<10}{'estimate MB':>13}{'lease MB':>10}{'allocated +MB':>15}"
        f"{'parameter MB':>14}{'lease/alloc':>13}"
    )
    for r in rows:
        ratio = r.lease_mb / r.allocated_mb if r.allocated_mb else float("nan")
        print(
            f"{r.model:<10}{r.estimate_mb:>13,}{r.lease_mb:>10,}{r.allocated_mb:>15,.0f}"
            f"{r.parameter_mb:>14,.0f}{ratio:>13.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes-gb", type=float, nargs=2, default=[3.0, 2.0], help="the two models' sizes"
    )
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative gap")
    parser.add_argument(
        "--device",
        default="cuda:0",
        help="the GPU to check, e.g. cuda:1 (a worker pinned to it must measure on it)",
    )
    args = parser.parse_args(argv)
    if min(args.sizes_gb) <= 0 or args.tolerance < 0:
        parser.error("sizes must be > 0 and the tolerance >= 0")
    torch = cuda_torch()
    if torch is None:
        print("skipped: no CUDA")
        return 0
    problems = asyncio.run(check(torch, args.device, args.sizes_gb, args.tolerance))
    for problem in problems:
        print(f"FAIL {problem}")
    print("leases agree with torch" if not problems else f"{len(problems)} disagreement(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
