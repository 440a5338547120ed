"""Every background loop of the services stops when its owner closes it, even when it is woken in
the same turn of the event loop: on Python 3.11 `asyncio.wait_for` returned the woken wait's result
and lost the cancellation (cpython#86296), so such a loop ran for ever and the process never shut
down (ruff now bans wait_for in the services). And `background.stop`, which every owner's close
uses, lets a cancellation of its own caller through. In memory: the loops are woken and stopped
before they reach anything outside."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from broker import background
from broker.licensing.pending import PendingCheckouts
from broker.licensing.trials import TrialClock
from broker.licensing.watch import MachineWatch
from broker.transports.sweep import DatabaseSweep
from tests.support.stopping import Running, stops_when_woken_as_closed

# A loop's owner as the tests drive it: start it, wake it, close it.
Owner = tuple[Callable[[], None], Callable[[], None], Callable[[], Coroutine[Any, Any, None]]]


class Unreachable:
    """What a loop would use once woken: it never gets that far here (any use raises)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a stopped loop used {name}")


class QuietTrials:
    """The trial clock's store: no trial due, none running."""

    async def end_due(self) -> int:
        return 0

    async def next_end(self) -> None:
        return None


class OneHeldMachine:
    """The stream hub as the machine watch sees it: one machine held, of license lic_1."""

    def machines_of(self, license_id: str) -> set[str]:
        return {"m_1"}

    def held_machines(self) -> dict[str, str]:
        return {"m_1": "lic_1"}

    def end_machines(self, license_id: str, machine_ids: set[str]) -> int:
        raise AssertionError("a stopped loop ended streams")


def _sweep() -> Owner:
    sweep = DatabaseSweep(Unreachable(), interval=60)  # type: ignore[arg-type]
    return (lambda: sweep.start(lambda event: None)), sweep.wake, sweep.stop


def _pending() -> Owner:
    pending = PendingCheckouts(Unreachable(), Unreachable(), Unreachable(), ttl=3600)  # type: ignore[arg-type]
    return pending.start, pending.wake, pending.close


def _trial_clock() -> Owner:
    clock = TrialClock(QuietTrials(), rescan=60)  # type: ignore[arg-type]
    return clock.start, clock.wake, clock.close


def _machine_watch() -> Owner:
    watch = MachineWatch(Unreachable(), OneHeldMachine(), Unreachable(), sweep_interval=60, machine_ttl=None)  # type: ignore[arg-type]
    return watch.start, lambda: watch.prompt("lic_1"), watch.close


@pytest.mark.parametrize(
    "component",
    [_sweep, _pending, _trial_clock, _machine_watch],
    ids=["database sweep", "pending checkouts", "trial clock", "machine watch"],
)
async def test_a_background_loop_woken_as_it_is_closed_stops(component: Callable[[], Owner]) -> None:
    async def started() -> Running:
        start, wake, close = component()
        start()
        for _ in range(5):  # into its wait (what it does first is in memory)
            await asyncio.sleep(0)
        return wake, close

    await stops_when_woken_as_closed(started)


async def test_stop_lets_a_cancellation_of_its_caller_through() -> None:
    # A task slow to end (it cleans up for a while once cancelled): the owner closing it is itself
    # cancelled meanwhile (a shutdown's deadline) and must end cancelled, not return as if done.
    cleaning = asyncio.Event()
    release = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await release.wait()

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    closing = asyncio.create_task(background.stop(task))
    async with asyncio.timeout(5):
        await cleaning.wait()
    closing.cancel()
    done, _ = await asyncio.wait({closing}, timeout=5)
    assert done and closing.cancelled()
    release.set()
    async with asyncio.timeout(5):
        await asyncio.wait({task})
    assert task.cancelled()


async def test_stop_raises_the_error_the_task_ended_with_and_takes_none() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("its cleanup failed")

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="its cleanup failed"):
        await background.stop(task)
    await background.stop(None)
