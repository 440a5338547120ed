"""An ingest in a process of its own, for tests/test_fast_ingest.py: two such processes decide
their events at the same moment, each waiting after its fast path's first read until the other
has read too (the race, every time, across two interpreters, engines and connection pools)."""

from __future__ import annotations

import asyncio
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import orjson

from broker.ingest import Ingestor, Outcome
from broker.ingest.batched import BatchedIngest
from broker.runtime import open_runtime
from broker.stripe_ledger.ledger import LicenseRules
from tests.support.licenses import make_settings


def ingest_once_both_have_read(database_url: str, event: dict[str, Any], barrier: Barrier, results: Queue) -> None:  # type: ignore[type-arg]
    """Puts (outcome, seq, what each fast-path attempt did) on `results`, or the traceback."""
    try:
        results.put(asyncio.run(_ingest(database_url, event, barrier)))
    except BaseException:
        results.put(traceback.format_exc())


async def _ingest(database_url: str, event: dict[str, Any], barrier: Barrier) -> tuple[str, int | None, list[bool]]:
    read, apply = BatchedIngest._read, BatchedIngest.apply
    reads = 0
    attempts: list[bool] = []  # True: the fast path decided the event; False: it gave up

    async def read_together(self: BatchedIngest, pg: Any, batch: list[Any]) -> Any:
        nonlocal reads
        found = await read(self, pg, batch)
        reads += 1
        if reads == 1:
            await asyncio.to_thread(barrier.wait, 30)
        return found

    async def counted(self: BatchedIngest, *args: Any) -> Outcome | None:
        result = await apply(self, *args)
        attempts.append(result is not None)
        return result

    BatchedIngest._read = read_together  # type: ignore[method-assign]
    BatchedIngest.apply = counted  # type: ignore[method-assign]
    async with open_runtime(make_settings(database_url)) as runtime:
        ingestor = Ingestor(runtime, LicenseRules(runtime.settings.entitled_statuses))
        outcome = await ingestor.ingest(event, orjson.dumps(event))
    return outcome.kind, outcome.event.seq if outcome.event else None, attempts
