"""Every row the ingest leaves, column for column, for comparing two databases (the two ingest
paths: tests/test_ingest_differential.py, tests/test_fast_ingest.py)."""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.schema import metadata, stripe_events, subscription_event_logs

# Wall-clock times (when each path's transaction ran) and the log's serial id (a transaction rolled
# back and retried, the batched path's conflict or the general path's LocksBusy, consumes values;
# waves of independent licenses commit in either order). The log entry's `data` holds its
# `recorded_at` too: compared without it.
EXCLUDED = {
    "licenses": {"created_at", "updated_at"},
    "stripe_events": {"received_at"},
    "stripe_objects": {"updated_at"},
    "stripe_bindings": {"bound_at"},
    "subscription_event_logs": {"id", "recorded_at"},
}


def _canonical(table: sa.Table, column: sa.Column[Any], value: Any) -> Any:
    if table is subscription_event_logs and column.name == "data":
        entry = orjson.loads(value)
        del entry["recorded_at"]  # the wall-clock time, as the column's (EXCLUDED)
        return entry
    return value


async def every_row(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every table, every column but the EXCLUDED ones, in a canonical order. JSON columns are
    compared as values (their encoding is not the rows'), but for the payload, which must be the
    body as Stripe sent it: compared as the text stored."""
    engine = create_engine(Settings(database_url=url))
    result = {}
    try:
        async with engine.connect() as conn:
            for table in metadata.sorted_tables:
                columns = [c for c in table.c if c.name not in EXCLUDED.get(table.name, ())]
                selected = [sa.cast(c, sa.Text).label(c.name) if c is stripe_events.c.payload else c for c in columns]
                rows = [
                    {str(c.name): _canonical(table, c, row[i]) for i, c in enumerate(columns)}
                    for row in await conn.execute(sa.select(*selected))
                ]
                result[table.name] = sorted(rows, key=lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
    finally:
        await engine.dispose()
    return result
