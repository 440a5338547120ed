"""The ingest's own errors: what the webhook answers on, whichever path and driver failed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy as sa


class IngestUnavailable(Exception):
    """Nothing was committed, and a later delivery may succeed: the database, or a read from
    Stripe's API the event cannot be judged without, failed. The webhook answers 503 (Stripe
    retries). `what` names the service; the message is the cause's, never the event's content."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.what = what


class IngestRefused(Exception):
    """The database refuses a value the event carries (not an outage): nothing of it was written.
    The ingest records the event without its content instead (a retry could not fix it)."""


@contextmanager
def database_errors() -> Iterator[None]:
    """The drivers' errors as the ingest's: content refused, or the database unavailable."""
    try:
        yield
    except (sa.exc.DataError, psycopg.DataError) as exc:
        raise IngestRefused(type(getattr(exc, "orig", None) or exc).__name__) from exc
    except (sa.exc.SQLAlchemyError, psycopg.Error, OSError, TimeoutError) as exc:
        raise IngestUnavailable("database", exc) from exc
