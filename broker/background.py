"""Owned background tasks: started by a component, cancelled and awaited when it closes."""

from __future__ import annotations

import asyncio


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel and wait for `task` (None is fine), so that nothing outlives its owner; an error it
    ended with is raised here. A cancellation of the caller while it waits is not swallowed (as
    `await task` under `suppress(CancelledError)` would: the task's and the caller's are one type)."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.result()
