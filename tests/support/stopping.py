"""A background loop woken in the turn its owner closes it must still stop (docs/testing.md: on
Python 3.11 `asyncio.wait_for` lost that cancellation). Shared by tests/test_stopping.py and the
cluster transport's test in tests/test_transports.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

# A started loop's owner as the tests drive it: wake it, close it.
Running = tuple[Callable[[], None], Callable[[], Coroutine[Any, Any, None]]]


async def stops_when_woken_as_closed(started: Callable[[], Awaitable[Running]]) -> None:
    """The wake before or after the close, some turns of the loop apart: one of them lands where
    the close cancels the loop's wait as the wake completes it. `started`: a fresh loop, waiting."""
    for wake_first in (True, False):
        for turns in range(4):
            wake, close = await started()
            closing: list[asyncio.Task[None]] = []

            def close_now(
                close: Callable[[], Coroutine[Any, Any, None]] = close, closing: list[asyncio.Task[None]] = closing
            ) -> None:
                closing.append(asyncio.create_task(close()))

            first, second = (wake, close_now) if wake_first else (close_now, wake)
            first()
            for _ in range(turns):
                await asyncio.sleep(0)
            second()
            done, _ = await asyncio.wait(closing, timeout=5)
            assert done, f"{'woken' if wake_first else 'closed'} first, {turns} turns apart: the loop did not stop"
            closing[0].result()
