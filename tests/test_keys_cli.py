"""`darkroom keys` against a real bus: create, list, revoke; keys are stored hashed."""

from __future__ import annotations

import pytest

from bus.runtime.context import Context
from bus.state.keys import list_keys
from tests.support import procs

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def test_create_list_revoke(ctx: Context, subprocess_env: dict[str, str]) -> None:
    created = await procs.start(
        ["keys", "create", "--name", "ci bot", "--scopes", "read,upload"], subprocess_env
    )
    assert await created.wait() == 0
    token = created.lines[0]
    assert token.startswith("drk_") and "only time it is shown" in created.output
    [record] = await list_keys(ctx.js, ctx.api_keys)
    assert record.name == "ci bot" and record.scopes == ("read", "upload")
    assert token.split("_", 2)[2] not in record.encode().decode(), "the secret must not be stored"

    listed = await procs.start(["keys", "list"], subprocess_env)
    assert await listed.wait() == 0
    assert (
        record.id in listed.output and "read,upload" in listed.output and token not in listed.output
    )

    revoked = await procs.start(["keys", "revoke", record.id], subprocess_env)
    assert await revoked.wait() == 0
    assert await list_keys(ctx.js, ctx.api_keys) == []
    again = await procs.start(["keys", "revoke", record.id], subprocess_env)
    assert await again.wait() == 1 and "no API key with id" in again.output


async def test_bad_scopes_are_refused(ctx: Context, subprocess_env: dict[str, str]) -> None:
    bad = await procs.start(
        ["keys", "create", "--name", "x", "--scopes", "read,root"], subprocess_env
    )
    assert await bad.wait() == 2
    assert "scopes must be a non-empty list of read, upload, generate, admin" in bad.output


async def test_admin_commands_never_create_or_reconfigure_a_deployment(
    settings: object, subprocess_env: dict[str, str]
) -> None:
    # No context fixture here: nothing has been deployed under this namespace.
    listed = await procs.start(["keys", "list"], subprocess_env)
    assert await listed.wait() == 2
    assert "no darkroom deployment with namespace" in listed.output


async def test_a_revoked_admin_key_is_not_brought_back_on_restart(
    ctx: Context, tmp_path: object
) -> None:
    from pathlib import Path

    from bus.ops.stack import ensure_admin_key
    from bus.state.keys import revoke_key, split_token

    data_dir = Path(str(tmp_path))
    first, minted = await ensure_admin_key(ctx, data_dir)
    assert minted
    assert await ensure_admin_key(ctx, data_dir) == (first, False)
    parts = split_token(first)
    assert parts is not None
    assert await revoke_key(ctx.api_keys, parts[0])
    assert not await revoke_key(ctx.api_keys, parts[0]), "already revoked"
    second, minted = await ensure_admin_key(ctx, data_dir)
    assert minted and second != first
    assert (data_dir / "admin.key").read_text().strip() == second
