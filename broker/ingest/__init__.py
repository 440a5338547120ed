"""The ingest use case: a verified Stripe event -> one transaction (the ledger, the bindings, the
licenses, the event log) -> publish. No HTTP here: webhook/ verifies, calls `Ingestor.ingest` and
answers."""

from broker.ingest.errors import IngestRefused, IngestUnavailable
from broker.ingest.outcomes import NOT_MATCHED, AfterCommit, Outcome, OutcomeKind
from broker.ingest.records import unmatched_events
from broker.ingest.service import Ingestor

__all__ = [
    "NOT_MATCHED",
    "AfterCommit",
    "IngestRefused",
    "IngestUnavailable",
    "Ingestor",
    "Outcome",
    "OutcomeKind",
    "unmatched_events",
]
