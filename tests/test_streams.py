"""Declaring streams is idempotent and never downgrades what another process set up."""

from __future__ import annotations

import pytest

from bus.core.contract import Spec
from bus.core.settings import Settings
from bus.runtime.context import open_context
from bus.runtime.registry import load, registered_names
from bus.runtime.streams import declare

pytestmark = [pytest.mark.nats, pytest.mark.s3]


async def test_redeclaring_with_defaults_keeps_wider_windows_and_extra_subjects(
    settings: Settings,
) -> None:
    patient = Spec("patient", listens=("a",), ack_wait=300, max_deliver=4)
    async with open_context(settings, [patient], "first") as ctx:
        info = await ctx.js.stream_info(ctx.names.stream)
        assert info.config.duplicate_window >= patient.longest_redelivery_gap
        extra = f"{ctx.names.namespace}-extra.>"
        info.config.subjects = [*info.config.subjects, extra]
        await ctx.js.update_stream(info.config)
        await declare(ctx.js, settings, [])  # e.g. a gateway with no functions
        again = await ctx.js.stream_info(ctx.names.stream)
        assert again.config.duplicate_window == info.config.duplicate_window
        assert extra in again.config.subjects and ctx.names.all_events in again.config.subjects
        consumer = await ctx.js.consumer_info(ctx.names.stream, ctx.names.durable("patient"))
        assert consumer.config.max_deliver == 4 and consumer.config.ack_wait == 300


async def test_a_gateway_sizes_the_window_for_every_registered_function(
    settings: Settings,
) -> None:
    """Workers may not declare streams, so the gateway's window must already cover the
    longest redelivery gap of every function a worker may run."""
    async with open_context(settings, [], "gateway") as ctx:
        info = await ctx.js.stream_info(ctx.names.stream)
    gaps = {name: load(name).spec.longest_redelivery_gap for name in registered_names()}
    assert info.config.duplicate_window >= max(gaps.values()), gaps
