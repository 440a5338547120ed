"""What the ingest of one event ends as, and why it may end without an outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from broker.storage.eventlog import LicenseEvent


class OutcomeKind(StrEnum):
    """`stripe_events.outcome`, and the webhook's answer (docs/stripe.md)."""

    APPLIED = "applied"  # a license changed: its log entry is published
    UNCHANGED = "unchanged"  # applied to the ledger, the license derived the same
    DUPLICATE = "duplicate"  # its id was recorded before (not recorded again)
    STALE = "stale"  # every object it reports holds a newer snapshot
    IGNORED = "ignored"  # its type is not used, or STRIPE_LIVEMODE / STRIPE_ACCOUNTS leave it out
    PENDING = "pending"  # its objects wait for a link to a license
    REJECTED = "rejected"  # it may not touch the license it names
    UNMATCHED = "unmatched"  # no license can be read from it
    LINKED = "linked"  # (stored only) a pending event whose objects a later event bound


# Events that changed no license, with a reason (`license-broker unmatched`).
NOT_MATCHED = (OutcomeKind.PENDING, OutcomeKind.UNMATCHED, OutcomeKind.REJECTED, OutcomeKind.IGNORED)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    license_id: str | None = None
    appended: tuple[LicenseEvent, ...] = ()  # log entries, one per license the event changed
    reason: str | None = None  # why it changed nothing (ignored, rejected, unmatched)
    object_id: str | None = None
    # False: the event is recorded without its payload (JSON null): its id, type and time only.
    keep_payload: bool = True

    @property
    def event(self) -> LicenseEvent | None:
        """The log entry of `license_id`, if the event changed it."""
        return next((e for e in self.appended if e.license_id == self.license_id), None)

    @property
    def to_publish(self) -> list[LicenseEvent]:
        return list(self.appended)


DUPLICATE = Outcome(OutcomeKind.DUPLICATE)

# Called between the commit and the publish (the fault tests kill the process there).
AfterCommit = Callable[[Outcome], None]
