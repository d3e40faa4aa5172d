"""The ``darkroom`` command.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or settings, 3 a server child kept
dying, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bus.core.settings import ConfigError, Settings, load_settings, parse_s3_url

log = logging.getLogger("darkroom")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: $DARKROOM_CONFIG or ./darkroom.toml)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where embedded servers keep data (default: ~/.local/share/darkroom; "
        "/var/lib/darkroom for root)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _endpoints(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats", metavar="URL", help="external NATS, e.g. nats://n1:4222,nats://n2:4222"
    )
    parser.add_argument(
        "--s3", metavar="URL", help="external S3, e.g. http://KEY:SECRET@minio:9000/bucket"
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="external PostgreSQL 15+ with pgvector, e.g. postgresql://USER:PASS@db:5432/darkroom "
        "(prefer $DARKROOM_POSTGRES__URL: flags show in ps)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkroom",
        description="Event-driven functions for image uploads: ingest, caption, generate, notify.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run everything on this machine",
        description="Start nats-server and SeaweedFS (unless --nats/--s3 name external ones), "
        "every function, and the gateway with its UI. Ctrl-C drains and stops.",
    )
    _common(up)
    _endpoints(up)
    up.add_argument("--host", help="gateway address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default 8080; 0 picks a free one)")
    up.add_argument(
        "--profile",
        choices=["auto", "demo"],
        help="auto: real models when available, else tiny demo ones; demo: always tiny ones",
    )

    gateway = sub.add_parser(
        "gateway",
        help="run only the HTTP gateway (stateless; scale behind a load balancer)",
        description="Serve the API and UI against external NATS and S3 (or this machine's "
        "running `darkroom up`). Runs no functions and never mints keys.",
    )
    _common(gateway)
    _endpoints(gateway)
    gateway.add_argument("--host", help="listen address (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="listen port (default 8080)")

    worker = sub.add_parser(
        "worker",
        help="run one function (scale out by starting more)",
        description="Consume one function's durable consumer. Any number of workers, on any "
        "machines, share its work. SIGTERM drains: stop fetching, finish, ack, exit.",
    )
    _common(worker)
    _endpoints(worker)
    worker.add_argument(
        "function",
        help="function name (see `darkroom functions`), or a module path such as mypkg.myfunction",
    )
    worker.add_argument(
        "--concurrency", type=int, metavar="N", help="handler invocations in flight"
    )
    worker.add_argument(
        "--device",
        metavar="DEV",
        help="GPU functions: lease VRAM on this device only (cuda:1, cpu); "
        "default: the device with the most free room",
    )

    keys = sub.add_parser(
        "keys", help="manage API keys", description="Create, list and revoke scoped API keys."
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--scopes", required=True, help="comma-separated: read, upload, generate, admin"
    )
    keys_sub.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    for p in (create, keys_sub.choices["list"], revoke):
        _common(p)
        _endpoints(p)

    gpus = sub.add_parser(
        "gpus",
        help="list devices in the VRAM lease ledger, their leases and holders",
        description="Show every device a worker registered in the VRAM lease ledger: mode, "
        "capacity, used and free memory, and each live lease's model, size and holder "
        "(host/pid/worker). Lapsed leases are left out.",
    )
    _common(gpus)
    _endpoints(gpus)
    gpus.add_argument("--json", action="store_true", help="print the devices as JSON")

    functions = sub.add_parser("functions", help="list registered functions and their specs")
    _common(functions)

    db = sub.add_parser(
        "db",
        help="print how to reach the catalogue database with psql",
        description="Print a psql command for the read model's PostgreSQL (the embedded one of "
        "a running `darkroom up`, or --postgres), with the namespace's schema on the search "
        "path. It contains the password: keep the output private.",
    )
    _common(db)
    _endpoints(db)
    db.add_argument("--url", action="store_true", help="print only the connection URL")

    nats_config = sub.add_parser(
        "nats-config",
        help="print the nats-server users for a deployment (one per role)",
        description="Print the authorization section of a nats-server configuration: one "
        "user per darkroom role (gateway, worker, status, s3-notify) with exactly the "
        "permissions that role needs, passwords read from the server's environment "
        "(NATS_<ROLE>_PASSWORD), for the configured namespace. "
        "deploy/nats/darkroom-auth.conf is this output for the default one.",
    )
    _common(nats_config)

    reindex = sub.add_parser(
        "reindex",
        help="rebuild the catalogue database from the store and the event stream",
        description="Empty the read model of this namespace, then rebuild it: first from the "
        "objects in the store (originals, ingest.json, caption.json), for images whose events "
        "have aged out of the stream, then by replaying every lifecycle event still in the "
        "stream. It loses nothing while darkroom runs (newer events always win over older "
        "ones), but the gallery fills up again from empty while it works.",
    )
    _common(reindex)
    _endpoints(reindex)
    reindex.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _upload_parser(sub)
    _generate_parser(sub)
    _models_parser(sub)
    return parser


def _models_parser(sub: Any) -> None:
    from bus.core.settings import MODEL_TASKS

    models = sub.add_parser(
        "models",
        help="list the model of each task and the generation models, or download them",
        description="Each task (caption, tags, embed, nsfw) uses the model named in the "
        "[models] settings, and each generation model of the [generate] catalogue its "
        "diffusers pipeline; or a tiny offline demo model (profile demo, or profile auto when "
        "the real one is neither local, cached nor downloadable).",
    )
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_sub.add_parser(
        "list",
        help="show each model's source, where it resolves, demo or real, cached or not",
        description="Resolve each task's model and each generation model as a worker would, "
        "without downloading anything (it may ask the hub whether a model exists, briefly; "
        "never with HF_HUB_OFFLINE=1).",
    )
    listing.add_argument("--profile", choices=["auto", "demo"], help="resolve under this profile")
    pull = models_sub.add_parser(
        "pull",
        help="download models into the Hugging Face cache, with progress",
        description="Download each named task's model or generation model (default: every "
        "task's, and the default generation model) into the normal Hugging Face cache "
        "(HF_HOME), so that workers start without waiting for it.",
    )
    pull.add_argument(
        "tasks",
        nargs="*",
        metavar="NAME",
        help=f"a task ({', '.join(MODEL_TASKS)}) or a generation model, e.g. sd-turbo "
        "(default: the tasks and the default generation model)",
    )
    pull.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    for p in (listing, pull):
        _common(p)


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    return parse


def _upload_parser(sub: Any) -> None:
    upload = sub.add_parser(
        "upload",
        help="send image files to a running gateway",
        description="Upload image files, and directories (recursively: jpg, jpeg, png, gif, "
        "webp, tif, tiff, heic, heif, avif), to a gateway with POST /api/uploads. Prints each "
        "file's image id or why it was rejected; exits 1 if any was rejected. The gateway is "
        "--url, else $DARKROOM_URL, else this machine's running `darkroom up`; the key is "
        "--key, else $DARKROOM_API_KEY, else <data-dir>/admin.key.",
    )
    _common(upload)
    upload.add_argument(
        "paths", nargs="*", type=Path, metavar="PATH", help="image files and directories"
    )
    upload.add_argument(
        "--watch",
        type=Path,
        metavar="DIR",
        help="then keep uploading image files that appear or change in DIR, once they stop "
        "growing, until Ctrl-C",
    )
    upload.add_argument(
        "--interval",
        type=_positive(float),
        default=1.0,
        metavar="SECONDS",
        help="how often --watch looks at DIR (default 1)",
    )
    upload.add_argument(
        "--jobs", type=_positive(int), default=4, metavar="N", help="requests in flight (default 4)"
    )
    upload.add_argument("--url", help="the gateway, e.g. http://127.0.0.1:8080")
    upload.add_argument(
        "--key", help="API key with the 'upload' scope (prefer $DARKROOM_API_KEY: flags show in ps)"
    )
    upload.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _generate_parser(sub: Any) -> None:
    from bus.core.settings import GENERATE_MODES

    gen = sub.add_parser(
        "generate",
        help="ask a running gateway for images from a prompt (or an image)",
        description="Send a generation request to a gateway (POST /api/generations) and print "
        "the job id; with --wait, show its steps and print the ids of the images it made "
        "(exit 1 if it fails or is cancelled). The gateway checks the request and says what "
        "is wrong (exit 2). The gateway and key are found as for `darkroom upload`.",
    )
    _common(gen)
    gen.add_argument(
        "prompt", nargs="?", help="what to draw (remix: the image's caption if left out)"
    )
    gen.add_argument("--image", metavar="ID", help="image modes: the catalogue image to start from")
    gen.add_argument(
        "--mode", choices=GENERATE_MODES, help="default txt2img, or img2img with --image"
    )
    gen.add_argument("--model", metavar="NAME", help="a catalogue model (default: the gateway's)")
    gen.add_argument("--n", type=int, metavar="N", help="how many images")
    gen.add_argument("--seed", type=int, metavar="N", help="default: drawn at random")
    gen.add_argument("--steps", type=int, metavar="N")
    gen.add_argument("--size", type=_size, metavar="WxH", help="e.g. 1024x768")
    gen.add_argument("--negative", metavar="TEXT", help="what to keep out of the picture")
    gen.add_argument("--guidance", type=float, metavar="X")
    gen.add_argument("--strength", type=float, metavar="X", help="image modes: (0, 1]")
    gen.add_argument("--wait", action="store_true", help="follow the job and print its image ids")
    gen.add_argument("--url", help="the gateway, e.g. http://127.0.0.1:8080")
    gen.add_argument(
        "--key",
        help="API key with the 'generate' scope (prefer $DARKROOM_API_KEY: flags show in ps)",
    )
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _size(text: str) -> tuple[int, int]:
    from bus.ops.generate_client import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "data_dir": getattr(args, "data_dir", None),
        "log_level": getattr(args, "log_level", None),
        "profile": getattr(args, "profile", None),
        "gateway": {"host": getattr(args, "host", None), "port": getattr(args, "port", None)},
        "gpu": {"device": getattr(args, "device", None)},
    }
    if getattr(args, "nats", None):
        overrides["nats"] = {"url": args.nats}
    if getattr(args, "s3", None):
        overrides["s3"] = parse_s3_url(args.s3)
    if getattr(args, "postgres", None):
        overrides["postgres"] = {"url": args.postgres}
    return load_settings(args.config, overrides)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from bus.ops.stack import resolve_endpoints
    from bus.runtime.context import open_context
    from bus.state import keys

    async with open_context(resolve_endpoints(settings), [], "cli", declare=False) as ctx:
        if args.keys_command == "create":
            token, record = await keys.create_key(
                ctx.api_keys, args.name, keys.parse_scopes(args.scopes)
            )
            print(token)
            print(
                f"created key {record.id} ({', '.join(record.scopes)}); "
                "this is the only time it is shown",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            records = await keys.list_keys(ctx.js, ctx.api_keys)
            print(f"{'ID':<14}{'NAME':<24}{'SCOPES':<28}CREATED")
            for r in records:
                print(f"{r.id:<14}{r.name[:23]:<24}{','.join(r.scopes):<28}{r.created}")
        elif args.keys_command == "revoke":
            if not await keys.revoke_key(ctx.api_keys, args.key_id):
                print(f"darkroom: no API key with id {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
    return 0


async def _gpus(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    from bus.gpu.leases import read_devices
    from bus.infra.nats_auth import Role
    from bus.ops.stack import resolve_endpoints
    from bus.runtime.context import open_context

    resolved = resolve_endpoints(settings, role=Role.STATUS)
    async with open_context(resolved, [], "cli", declare=False, role=Role.STATUS) as ctx:
        devices = await read_devices(ctx.js, ctx.names.leases_kv)
    if args.json:
        print(orjson.dumps({"devices": devices}, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not devices:
        print("no devices: no worker has registered a device in the VRAM lease ledger yet")
        return 0
    print(_gpu_row("HOST", "DEVICE", "MODE", "CAPACITY MB", "USED MB", "FREE MB"))
    for d in devices:
        print(
            _gpu_row(
                d["host"], d["device"], d["mode"], d["capacity_mb"], d["used_mb"], d["free_mb"]
            )
        )
        for kind, entries in (("lease", d["leases"]), ("queued", d["queue"])):
            for x in entries:
                h = x["holder"]
                print(
                    f"  {kind:<7}{x['model']:<32} {x['mb']:>7} MB  "
                    f"{h['host']}/{h['pid']}/{h['worker']}  for {x['age_s'] or 0:.0f} s"
                )
    return 0


def _gpu_row(
    host: str, device: str, mode: str, capacity: object, used: object, free: object
) -> str:
    return f"{host[:23]:<24}{device:<10}{mode:<10}{capacity:>12}{used:>10}{free:>10}"


def _functions(settings: Settings) -> int:
    from bus.runtime.registry import discover

    for name, fn in sorted(discover().items()):
        s = fn.spec
        own = settings.function(name)
        listens = own.listens or s.listens
        batch = f"batch {s.batch}" + (
            f" (waits {s.batch_wait_s:g}s to fill)" if s.batch > 1 else ""
        )
        hooks = [h for h in ("setup", "prepare", "teardown") if getattr(fn, h) is not None]
        print(f"{name}{'' if own.enabled else '  (disabled)'}  [{fn.module}]")
        print(f"  listens   {', '.join(listens)}")
        print(f"  emits     {', '.join(s.emits) or '(nothing)'}")
        print(
            f"  runs      {batch}, concurrency {own.concurrency or s.concurrency}, "
            f"ack_wait {s.ack_wait:g}s, timeout {s.timeout:g}s, max_deliver {s.max_deliver}, "
            f"backoff {', '.join(f'{b:g}s' for b in s.backoff) or 'none'}"
        )
        if s.needs_gpu:
            models = "its models (see: darkroom models list)" if fn.models else "models on demand"
            print(
                f"  gpu       leases VRAM for {models}; mode {settings.gpu.mode}"
                + (", preloaded at start" if settings.gpu.mode == "high" and fn.models else "")
            )
        if hooks:
            print(f"  lifespan  {', '.join(hooks)}")
        if fn.services:
            print(f"  serves    {', '.join(sorted(fn.services))} (request-reply)")
    return 0


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    from urllib.parse import quote

    from bus.ops.stack import resolve_endpoints

    resolved = resolve_endpoints(settings, database=True)
    assert resolved.postgres.url is not None
    url = resolved.postgres.url.get_secret_value()
    if args.url:
        print(url)
        return 0
    options = quote(f"-csearch_path={resolved.db_schema},public", safe="")
    separator = "&" if "?" in url else "?"
    print(f"# the read model of namespace {resolved.namespace!r} (schema {resolved.db_schema!r})")
    print(f'psql "{url}{separator}options={options}"')
    return 0


async def _reindex(args: argparse.Namespace, settings: Settings) -> int:
    from bus.ops.reindex import reindex
    from bus.ops.stack import resolve_endpoints
    from bus.runtime.context import open_context

    resolved = resolve_endpoints(settings, database=True)
    async with open_context(resolved, [], "reindex", declare=False, database=True) as ctx:
        summary = await reindex(ctx, progress=not args.quiet)
    print(summary.describe())
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from bus.core.settings import MODEL_TASKS
    from bus.models.catalogue import (
        PullError,
        default_generation_model,
        hub_reachable,
        pull,
        resolve,
    )

    if args.models_command == "pull":
        catalogue = settings.generate.catalogue
        unknown = [name for name in args.tasks if name not in MODEL_TASKS and name not in catalogue]
        if unknown:
            print(
                f"darkroom: no model task {', '.join(map(repr, unknown))}; "
                f"the tasks are {', '.join(MODEL_TASKS)}, and the generation models are "
                f"{', '.join(sorted(catalogue))}",
                file=sys.stderr,
            )
            return 2
        names: list[str] = list(args.tasks)
        try:
            if not names:
                names = list(MODEL_TASKS)
                if settings.function("generate").enabled:
                    names.append(default_generation_model(settings))
            for line in pull(settings, names, progress=not args.quiet):
                print(line)
        except PullError as exc:
            print(f"darkroom: {exc}", file=sys.stderr)
            return 1
        return 0
    logging.getLogger("darkroom.models").setLevel(logging.ERROR)  # the table says it all
    print(f"profile {settings.profile}")
    print(f"{'TASK':<9}{'USES':<6}{'CACHED':<8}{'SOURCE':<46}LOCATION")
    check = hub_reachable(settings.models.reachability_timeout_s)
    failed = False
    for task in MODEL_TASKS:
        source = settings.models.entry(task).source
        row = _ModelRow(f"{task:<9}", "", source, settings.profile)
        failed |= not row.show(lambda t=task: resolve(settings, t, check), NOT_CACHED)
    return 2 if _generation_models(settings, check) or failed else 0


def _generation_models(settings: Settings, check: Any) -> bool:
    """``models list``'s second table: each generation model as a worker here resolves it;
    whether any is unavailable."""
    from bus.models.catalogue import default_generation_model, resolve_generation

    default = default_generation_model(settings, check)
    print()
    print(f"{'GENERATE':<26}{'USES':<6}{'CACHED':<8}{'DEFAULT':<9}{'SOURCE':<46}LOCATION")
    failed = False
    for name, entry in sorted(settings.generate.catalogue.items()):
        mark = "default" if name == default else "-"
        row = _ModelRow(f"{name:<26}", f"{mark:<9}", entry.source, settings.profile)
        failed |= not row.show(
            lambda n=name: resolve_generation(settings, n, check),
            f"not downloaded (darkroom models pull {name})",
        )
    return failed


class _ModelRow:
    """One row of ``models list``: the model a name resolves to, or why it cannot."""

    def __init__(self, first: str, mark: str, source: str, profile: str) -> None:
        self.first, self.mark, self.source, self.profile = first, mark, source, profile

    def show(self, resolve_it: Any, not_cached: str) -> bool:
        """Print the row; False when the model is unavailable (the fix is printed too)."""
        from bus.models.catalogue import ModelUnavailableError
        from bus.models.demo import is_built

        try:
            m = resolve_it()
        except ModelUnavailableError as exc:
            print(f"{self.first}{'-':<6}{'-':<8}{self.mark}{self.source:<46}UNAVAILABLE")
            print("  " + str(exc).replace("\n", "\n  "))
            return False
        if m.demo:
            built = "yes" if is_built(Path(m.location)) else "no"
            shown = "demo (tiny, random weights)"
            print(f"{self.first}{'DEMO':<6}{built:<8}{self.mark}{shown:<46}{m.location}")
            if self.profile != "demo":
                print(f"  instead of {self.source}: {m.reason}")
            return True
        cached = "yes" if m.cached else "no"
        shown = m.source + (f"@{m.revision}" if m.revision else "")
        where = m.location if m.cached else not_cached
        print(f"{self.first}{'real':<6}{cached:<8}{self.mark}{shown:<46}{where}")
        return True


NOT_CACHED = "downloaded before the function takes events (or: darkroom models pull)"


def _upload(args: argparse.Namespace, settings: Settings, environ: dict[str, str]) -> int:
    from bus.ops.upload_client import UploadOptions, run_upload

    options = UploadOptions(
        paths=tuple(args.paths),
        data_dir=settings.data_dir,
        watch=args.watch,
        url=args.url,
        key=args.key,
        environ=environ,
        interval=args.interval,
        jobs=args.jobs,
        quiet=args.quiet,
    )
    return _run(lambda: run_upload(options))


def _generate(args: argparse.Namespace, settings: Settings, environ: dict[str, str]) -> int:
    from bus.ops.generate_client import GenerateOptions, run_generate

    width, height = args.size or (None, None)
    options = GenerateOptions(
        data_dir=settings.data_dir,
        prompt=args.prompt,
        negative_prompt=args.negative,
        image=args.image,
        mode=args.mode or ("img2img" if args.image else None),
        model=args.model,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        width=width,
        height=height,
        guidance=args.guidance,
        strength=args.strength,
        wait=args.wait,
        url=args.url,
        key=args.key,
        environ=environ,
        quiet=args.quiet,
    )
    return _run(lambda: run_generate(options))


def _run(coro_factory: Callable[[], Awaitable[int]]) -> int:
    async def main() -> int:
        return await coro_factory()

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bus.gpu.leases import LeaseError, LedgerUnavailableError
    from bus.infra.nats_conn import NatsUnavailableError
    from bus.infra.postgres import DatabaseUnavailableError
    from bus.infra.store import StoreUnavailableError
    from bus.ops.embedded import ChildError
    from bus.ops.stack import StartupError, run_gateway, run_up, run_worker
    from bus.ops.upload_client import UploadFailedError, UploadUsageError
    from bus.runtime.streams import NotDeployedError
    from bus.state.keys import KeyError_

    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        if args.command == "up":
            return _run(lambda: run_up(settings))
        if args.command == "gateway":
            return _run(lambda: run_gateway(settings))
        if args.command == "worker":
            return _run(lambda: run_worker(settings, args.function, args.concurrency))
        if args.command == "keys":
            return _run(lambda: _keys(args, settings))
        if args.command == "gpus":
            return _run(lambda: _gpus(args, settings))
        if args.command == "nats-config":
            from bus.ops.natsconfig import deploy_config

            sys.stdout.write(deploy_config(settings.namespace))
            return 0
        if args.command == "functions":
            return _functions(settings)
        if args.command == "db":
            return _run(lambda: _db(args, settings))
        if args.command == "reindex":
            return _run(lambda: _reindex(args, settings))
        if args.command == "upload":
            return _upload(args, settings, dict(os.environ))
        if args.command == "generate":
            return _generate(args, settings, dict(os.environ))
        if args.command == "models":
            return _models(args, settings)
    except (StartupError, KeyError_, LookupError, NotDeployedError, UploadUsageError) as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return 2
    except (
        NatsUnavailableError,
        StoreUnavailableError,
        ChildError,
        UploadFailedError,
        LedgerUnavailableError,
        DatabaseUnavailableError,
    ) as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return 1
    except LeaseError as exc:  # e.g. --device names a GPU this host does not have
        print(f"darkroom: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
