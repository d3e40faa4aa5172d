"""Signals for long-running commands: the first SIGINT/SIGTERM drains, a second exits."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

log = logging.getLogger("darkroom")


class Stopper:
    """First SIGINT/SIGTERM: drain and stop. Second: stop now."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""
        self.exit_code = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signalled, sig)

    def _signalled(self, sig: signal.Signals) -> None:
        if self.event.is_set():
            log.warning("second %s: exiting without draining", sig.name)
            sys.exit(130)
        log.info("%s received: draining (send again to exit at once)", sig.name)
        self.stop(f"{sig.name} received")

    def stop(self, reason: str, exit_code: int = 0) -> None:
        if not self.event.is_set():
            self.reason, self.exit_code = reason, exit_code
            self.event.set()
