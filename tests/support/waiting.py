"""Polling with a deadline (never sleeping as synchronisation), and free ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from localcluster import free_port, wait_until

__all__ = ["async_wait_until", "free_port", "wait_until"]


async def async_wait_until(predicate: Callable[[], bool], deadline_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
