"""The WRITE statement of the batched path, its column lists generated from broker.storage.schema:
each table's rows arrive as one JSON document (`json_to_recordset`), whose keys are the table's
column names. A column is written from the JSON, or stamped with the transaction's time, or
left to its default; which one is said here once per table, and a column added to the schema
is written from the JSON unless it is named otherwise (and a test compares every column of both
paths' rows: tests/test_ingest_differential.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from broker.storage.schema import licenses, stripe_bindings, stripe_events, stripe_links, stripe_objects
from broker.storage.schema import subscription_event_logs as event_log

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def _record_type(column: sa.Column[object]) -> str:
    # Strings as text: the column's own length applies on assignment (and fails, never truncates).
    if isinstance(column.type, sa.String):
        return "text"
    return column.type.compile(dialect=_DIALECT)


@dataclass(frozen=True, slots=True)
class Rows:
    """One table's rows in the WRITE statement: `param` names its JSON document."""

    table: sa.Table
    param: str
    stamped: tuple[str, ...] = ()  # set to the transaction's time (%(now)s)
    defaulted: tuple[str, ...] = ()  # left to the column's default (or NULL)

    def __post_init__(self) -> None:
        unknown = {*self.stamped, *self.defaulted} - set(self.table.c.keys())
        if unknown:
            raise ValueError(f"{self.table.name} has no column {sorted(unknown)}")

    @property
    def columns(self) -> list[str]:
        """The columns the JSON rows carry, in the table's order: their keys."""
        return [c.name for c in self.table.c if c.name not in self.stamped and c.name not in self.defaulted]

    def source(self, alias: str) -> str:
        """`json_to_recordset(...) AS alias(column type, ...)`."""
        types = ", ".join(f"{c} {_record_type(self.table.c[c])}" for c in self.columns)
        return f"json_to_recordset(%({self.param})s::json) AS {alias}({types})"

    def insert(self, alias: str, tail: str = "") -> str:
        written = [*self.columns, *self.stamped]
        values = [f"{alias}.{c}" for c in self.columns] + ["%(now)s"] * len(self.stamped)
        return (
            f"INSERT INTO {self.table.name} ({', '.join(written)})\n"
            f"    SELECT {', '.join(values)}\n    FROM {self.source(alias)}\n    {tail}".rstrip()
        )

    def update(self, alias: str, key: Sequence[str] = ("id",)) -> str:
        sets = [f"{c} = {alias}.{c}" for c in self.columns if c not in key]
        sets += [f"{c} = %(now)s" for c in self.stamped]
        where = " AND ".join(f"t.{k} = {alias}.{k}" for k in key)
        return f"UPDATE {self.table.name} t SET {', '.join(sets)}\n    FROM {self.source(alias)}\n    WHERE {where}"

    def upsert_all(self, alias: str, key: Sequence[str] = ("id",)) -> str:
        """Insert, or on conflict of `key` overwrite every other column."""
        sets = [f"{c} = excluded.{c}" for c in [*self.columns, *self.stamped] if c not in key]
        return self.insert(alias, f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {', '.join(sets)}")


# The legacy lookup columns of stripe_events (0001-0002) are no longer written by any path; the
# log's id is its serial.
EVENTS = Rows(
    stripe_events,
    "events",
    stamped=("received_at",),
    defaulted=("stripe_customer_id", "stripe_subscription_id", "stripe_charge_id", "stripe_payment_intent_id"),
)
OBJECTS = Rows(stripe_objects, "objects", stamped=("updated_at",))
BINDINGS = Rows(stripe_bindings, "bindings", stamped=("bound_at",))
LINKS = Rows(stripe_links, "links")
CREATED = Rows(licenses, "created", stamped=("created_at", "updated_at"))
LICENSES = Rows(licenses, "licenses", stamped=("updated_at",), defaulted=("created_at",))
LOG = Rows(event_log, "log", defaulted=("id",))

# The events with their outcomes, and what the rules decided. Should another delivery of one of
# the events have been recorded after all, or a new license or binding been written meanwhile (ON
# CONFLICT), the division fails: the transaction is rolled back and the batch retried one event at
# a time (alone, such an event goes to the general path, which decides it on what is there now).
WRITE = f"""
WITH event AS (
    {EVENTS.insert("e", "ON CONFLICT (id) DO NOTHING RETURNING id")}
),
objects AS (
    {OBJECTS.upsert_all("o")}
),
bindings AS (
    {BINDINGS.insert("b", "ON CONFLICT DO NOTHING RETURNING stripe_id")}
),
created AS (
    {CREATED.insert("c", "ON CONFLICT DO NOTHING RETURNING id")}
),
links AS (
    {LINKS.insert("k", "ON CONFLICT DO NOTHING")}
),
license AS (
    {LICENSES.update("u")}
),
log AS (
    {LOG.insert("g")}
),
-- Pending events whose objects this transaction bound now count for their license.
linked AS (
    UPDATE stripe_events t SET outcome = 'linked', license_id = m.license_id
    FROM json_to_recordset(%(linked)s::json) AS m(object_id text, license_id text)
    WHERE t.outcome = 'pending' AND t.object_id = m.object_id
)
SELECT 1 / ((SELECT count(*) FROM event) = %(n)s AND (SELECT count(*) FROM bindings) = %(n_bindings)s
             AND (SELECT count(*) FROM created) = %(n_created)s)::int
"""
