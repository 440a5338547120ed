"""One Stripe event, one transaction: record it, update the ledger object it reports, bind it to
its license, derive the license from its objects and append to the log; then publish.

Early events: an object whose license is not known yet (an invoice before the Checkout Session that
names its subscription) is kept in the ledger unbound ("pending"); the event that binds one of its
ids binds it too, and the license derived then includes it. A customer-level object (entitlement
summary, deleted customer) moves every license that holds an object of its customer.

Two paths write the transaction: the general one (broker.ingest.general, SQLAlchemy, any database)
and, on Postgres, the batched one (broker.ingest.batched: several events per transaction in two
round trips), which gives back to the general path what it cannot decide."""

from __future__ import annotations

import logging
from typing import Any

from broker import metrics
from broker.ingest.batched import BatchedIngest
from broker.ingest.errors import IngestRefused, IngestUnavailable, database_errors
from broker.ingest.general import GeneralIngest
from broker.ingest.outcomes import AfterCommit, Outcome, OutcomeKind
from broker.ingest.records import envelope_problem
from broker.runtime import Runtime
from broker.storage.eventlog import LicenseEvent
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import (
    BadLicenseId,
    EventFilter,
    Reported,
    Unprocessable,
    report,
    unlinked_version,
)
from broker.stripe_ledger.refresh import NoRefresh, Refresher, StripeUnavailable

log = logging.getLogger("broker.ingest")

REFUSED = "content the database refuses"


class Ingestor:
    """The ingest use case: `ingest(event, raw)` commits the event's transaction and publishes what
    it appended. `batching`: decide the events the batched path can on it (Postgres only); default:
    on Postgres."""

    def __init__(
        self,
        runtime: Runtime,
        rules: LicenseRules,
        event_filter: EventFilter | None = None,
        refresher: Refresher | None = None,
        after_commit: AfterCommit | None = None,
        *,
        batching: bool | None = None,
    ) -> None:
        self.runtime = runtime
        self.filter = event_filter or EventFilter()
        self.refresher = refresher or NoRefresh()
        postgres = runtime.engine.dialect.name == "postgresql"
        if batching and not postgres:
            raise ValueError("the batched ingest needs Postgres")
        self.general = GeneralIngest(runtime.engine, rules, self.refresher)
        self.batched = (
            BatchedIngest(runtime.engine, rules, refreshes=not isinstance(self.refresher, NoRefresh))
            if (postgres if batching is None else batching)
            else None
        )
        self.after_commit = after_commit
        self._warned_unlinked = False

    async def ingest(self, event: dict[str, Any], raw: bytes | None = None) -> Outcome:
        """`raw`: the verified body `event` was parsed from, stored as it is (default: re-encoded).
        Raises IngestUnavailable when nothing was committed and a retry may succeed."""
        problem = envelope_problem(event)
        if problem is not None:
            # Not even storable under its id; answered 2xx all the same (a retry cannot fix it).
            log.warning("webhook event not recorded: %s", problem)
            return Outcome(OutcomeKind.UNMATCHED, reason=problem)
        try:
            with database_errors():
                outcome = await self._commit(event, raw)
        except IngestRefused as exc:
            # Content the database refuses (not an outage): recorded without it, never a 5xx,
            # which Stripe would retry for three days.
            log.warning("webhook %s: content refused by the database (%s)", event["id"], exc)
            outcome = await self._record_refused(event)
        except StripeUnavailable as exc:
            raise IngestUnavailable("Stripe API", exc) from exc
        if self.after_commit is not None:
            self.after_commit(outcome)
        for appended in outcome.to_publish:
            await self._publish(appended)
        return outcome

    async def _record_refused(self, event: dict[str, Any]) -> Outcome:
        outcome = Outcome(OutcomeKind.UNMATCHED, reason=REFUSED)
        stub = {"id": event["id"], "type": event["type"], "created": event["created"], "refused": True}
        with database_errors():
            return await self.general.record(stub, None, outcome)

    async def _commit(self, event: dict[str, Any], raw: bytes | None) -> Outcome:
        screened = self.screen(event)
        if isinstance(screened, Outcome):
            return await self.general.record(event, raw, screened)
        if self.batched is not None and self.batched.eligible(screened):
            outcome = await self.batched.apply(event, raw, screened)
            if outcome is not None:
                return outcome
        return await self.general.commit(event, raw, screened)

    def screen(self, event: dict[str, Any]) -> Outcome | Reported:
        """What the event reports, or its outcome when it cannot change a license."""
        reason = self.filter.reason(event)
        if reason is not None:
            return Outcome(OutcomeKind.IGNORED, reason=reason)
        if not self._warned_unlinked and unlinked_version(event.get("api_version")):
            self._warn_unlinked(event["api_version"])
        try:
            reported = report(event)
        except BadLicenseId as exc:
            return Outcome(OutcomeKind.REJECTED, reason=str(exc))
        except Unprocessable as exc:
            return Outcome(OutcomeKind.UNMATCHED, reason=str(exc))
        if reported is None:
            # A type no rule reads (customer.created, with its name and address): nothing will
            # ever read its payload, so only the id (idempotency), type and time are recorded.
            # Events ignored by STRIPE_LIVEMODE or STRIPE_ACCOUNTS keep theirs: after fixing the
            # setting, `license-broker rebuild` applies them (prune drops it after the retention).
            return Outcome(OutcomeKind.IGNORED, reason="event type not used", keep_payload=False)
        return reported

    def _warn_unlinked(self, api_version: str) -> None:
        """Once per process: the endpoint's API version cannot link subscription payments."""
        self._warned_unlinked = True
        if isinstance(self.refresher, NoRefresh):
            log.warning(
                "Stripe events of API version %s name no payment on their invoices and come without "
                "invoice_payment.paid: refunds and disputes of subscription payments cannot reach their "
                "licenses. Set STRIPE_API_KEY (the broker then reads each paid invoice's payments) or move "
                "the webhook endpoint to API version 2025-05-28 or later (docs/stripe.md)",
                api_version,
            )

    async def _publish(self, event: LicenseEvent) -> None:
        # After the commit the event is safe; a failed publish only delays it until the stream's
        # gap fetch or database sweep finds it, so it is logged and counted, never fatal.
        try:
            await self.runtime.transport.publish(event.license_id, event.data)
        except Exception as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("publish of %s seq %d failed: %s", event.license_id, event.seq, exc)
