"""The API contract: the OpenAPI document is valid OpenAPI 3.1 and says what the gateway does,
and schemathesis, run over all of it (every check, the stateful phase included) against the
gateway served as ``darkroom up`` serves it, finds nothing.

What schemathesis cannot know from a schema (an upload is judged by its bytes...) is written,
with the reason, in schemathesis.toml at the repository root; the CLI run by hand reads it too.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis.engine import events, from_schema

from bus.core.settings import GENERATE_MODEL_NAME
from bus.core.subjects import SAFE_ID_PATTERN
from bus.gateway import openai_images
from bus.gateway.app import build_app, make_app_runner, route_table
from bus.gateway.routes import PUBLIC
from bus.runtime.context import Context
from bus.runtime.registry import load
from bus.state.keys import KEY_ID_RE
from bus.state.webhooks import ENDPOINT_ID_PATTERN, MESSAGE_ID_PATTERN
from tests.support.http import auth

pytestmark = [pytest.mark.nats, pytest.mark.s3]

CONFIG = Path(__file__).resolve().parents[1] / "schemathesis.toml"
MAX_EXAMPLES = 50  # per operation and phase: the whole run stays well under a minute
SEED = 20261128  # the same cases on every run; change it to look elsewhere


async def fetch_document(client: TestClient[Any, Any], token: str) -> dict[str, Any]:
    response = await client.get("/api/openapi.json", headers=auth(token))
    assert response.status == 200
    doc: dict[str, Any] = await response.json()
    return doc


async def test_the_document_is_valid_openapi_3_1(
    client: TestClient[Any, Any], admin: str, ctx: Context
) -> None:
    doc = await fetch_document(client, admin)
    OpenAPIV31SpecValidator(doc).validate()  # raises, saying where, if it is not
    operations = {
        op["operationId"]: (method, path)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    assert len(operations) == len(route_table()), "operationIds are unique"
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for status, answer in op["responses"].items():
                for link in answer.get("links", {}).values():
                    assert link["operationId"] in operations, (path, status, link)
                if int(status) >= 400:  # /v1 answers OpenAI's error object
                    kind = (
                        "application/json"
                        if path.startswith("/v1/")
                        else "application/problem+json"
                    )
                    assert list(answer["content"]) == [kind], (path, status)
                if status == "503":
                    assert answer["headers"]["Retry-After"]["required"] is True, path
    ids = {
        (param["name"], param["schema"].get("pattern"))
        for ops in doc["paths"].values()
        for op in ops.values()
        for param in op.get("parameters", [])
        if param["in"] == "path"
    }
    assert ids == {
        ("image_id", SAFE_ID_PATTERN),
        ("job_id", SAFE_ID_PATTERN),
        ("key_id", KEY_ID_RE.pattern),
        ("model_name", GENERATE_MODEL_NAME),
        ("seq", r"^[0-9]{1,19}$"),
        ("endpoint_id", ENDPOINT_ID_PATTERN),
        ("delivery_id", MESSAGE_ID_PATTERN),
    }
    size = doc["components"]["schemas"]["PresignRequest"]["properties"]["size"]
    assert size["maximum"] == ctx.settings.ingest.max_bytes, "this deployment's limit"


async def test_every_protected_route_documents_auth_and_every_check_its_error(
    client: TestClient[Any, Any], admin: str
) -> None:
    doc = await fetch_document(client, admin)
    for route in route_table():
        responses = doc["paths"][route.path][route.method.lower()]["responses"]
        if route.scope != PUBLIC:
            assert {"401", "403"} <= responses.keys(), route.path
            assert "WWW-Authenticate" in responses["401"]["headers"]
        if route.query_model is not None:
            assert "400" in responses, route.path
        if route.body_model is not None:
            assert {"400", "413", "415", "422"} <= responses.keys(), route.path


async def test_refusals_name_the_field_what_it_must_be_and_what_came(
    client: TestClient[Any, Any], admin: str
) -> None:
    async def problem(
        method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, str]:
        response = await client.request(
            method, url, headers=auth(admin) | (headers or {}), **kwargs
        )
        assert response.content_type == "application/problem+json"
        return response.status, (await response.json())["detail"]

    assert await problem("GET", "/api/images?status=lost&since=yesterday") == (
        400,
        "status must be one of 'uploaded', 'ingested', 'ready' or 'failed', got 'lost'; "
        "since must be an ISO 8601 time, got 'yesterday'",
    )
    assert await problem("GET", "/api/images?limit=1&limit=2") == (
        400,
        "limit is given more than once",
    )
    assert await problem("POST", "/api/keys", json={"name": " ", "scopes": []}) == (
        422,
        "name must not be blank, got ' '; scopes must have at least 1 item, got []",
    )
    assert await problem("POST", "/api/keys", data=b'{"name": "ci"}') == (
        415,
        "send the body as application/json, got application/octet-stream",
    )
    status, detail = await problem(
        "POST", "/api/keys", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and detail.startswith("Invalid JSON")
    # A value past 64 bits is shown, not a crash; a password in a URL is not shown.
    huge = {"content_type": "image/png", "size": {"n": 2**70}, "filename": ["http://u:pw1@h"]}
    status, detail = await problem("POST", "/api/uploads/presign", json=huge)
    assert status == 422 and str(2**70) in detail
    assert "pw1" not in detail and "http://u:***@h" in detail


async def test_json_integers_may_be_written_with_a_zero_fraction(
    client: TestClient[Any, Any], admin: str
) -> None:
    """JSON Schema's integer takes 516.0; a string is still no integer."""
    body = {"content_type": "image/png", "size": 516.0}
    response = await client.post("/api/uploads/presign", json=body, headers=auth(admin))
    assert response.status == 201 and (await response.json())["max_size"] == 516
    body["size"] = "516"
    response = await client.post("/api/uploads/presign", json=body, headers=auth(admin))
    assert response.status == 422


# --- schemathesis over the whole document -------------------------------------------------


@pytest.fixture
async def served(ctx: Context, run_function: Any) -> AsyncIterator[str]:
    """The gateway on a real port through make_app_runner, as ``darkroom up`` serves it, with
    ingest, caption and notify behind it; its base URL."""
    for name in ("ingest", "caption", "notify"):
        function = await run_function(load(name))
        # The caption worker answers the search and /v1 routes' services once prepared.
        await asyncio.wait_for(function.ready.wait(), 60)
    app = build_app(ctx)
    # No generate worker runs here: the OpenAI image routes answer 504 after this wait.
    app[openai_images.WAIT] = 1.0
    runner = make_app_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


def run_schemathesis(base_url: str, token: str) -> list[str]:
    """Every check failure and error of a whole schemathesis run (all phases), as text.
    Blocking: it sends its requests with ``requests``, so it runs off the event loop."""
    settings = tomllib.loads(CONFIG.read_text())
    settings.setdefault("checks", {})["enabled"] = True  # every check, as --checks all
    settings.update(
        seed=SEED,
        workers=1,
        headers={"Authorization": f"Bearer {token}"},
        generation={"max-examples": MAX_EXAMPLES, "database": "none"},
        cache={"enabled": False},  # nothing written into the repository, nothing replayed
    )
    config = schemathesis.Config.from_dict(settings)
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json", config=config)
    found: list[str] = []
    phases: dict[str, str] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        found.append(
                            f"{failure.code} {failure.title} on {event.recorder.label}:\n"
                            f"{failure.message}\n{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            found.append(f"error in {event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            found.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status.value
    if phases.get("stateful") != "success":  # it must have run: the links lead it on
        found.append(f"the stateful phase did not pass: {phases}")
    return sorted(set(found))


@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_failure(served: str, admin: str) -> None:
    found = await asyncio.to_thread(run_schemathesis, served, admin)
    assert not found, f"{len(found)} failures:\n\n" + "\n\n".join(found)
