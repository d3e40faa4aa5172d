"""Typed application keys: what the gateway's handlers share."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from bus.runtime.context import Context
from bus.state.keys import KeyCache

CTX = web.AppKey("ctx", Context)
KEYS = web.AppKey("keys", KeyCache)
STATIC_DIR = web.AppKey("static_dir", Path)
FUNCTIONS = web.AppKey("functions", list)  # names of the enabled functions
OPENAPI = web.AppKey("openapi", dict)  # the document, built once per app
