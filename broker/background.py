"""Owned background tasks: started by a component, cancelled and awaited when it closes."""

from __future__ import annotations

import asyncio
import contextlib


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel and wait for `task` (None is fine), so that nothing outlives its owner."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
