"""Stripe's fields as the ledger reads them: ids, timestamps, license ids, products, machine counts.
Pure: every kind's parser (broker.stripe_ledger.kinds) reads its object through these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.stripe_ledger.ledger import StripeObject

# Stripe ids fit these columns; a longer or odd value is content the broker cannot use.
MAX_ID = 255
MAX_LICENSE_ID = 200
MAX_CREATED = 2**53  # far beyond any real timestamp, well inside BIGINT


class Unprocessable(Exception):
    """A well-signed event whose content the broker cannot use: recorded with this reason, 2xx."""


class BadLicenseId(Unprocessable):
    """The event names a license by an id the broker cannot hold: rejected."""


@dataclass(frozen=True, slots=True)
class Reported:
    """What one event reports: ledger objects (the first is its own), and the license it names."""

    objects: tuple[StripeObject, ...]
    license_id: str | None = None
    # Named only by `client_reference_id`, which anyone can set on a Payment Link's URL.
    by_reference: bool = False
    customer_level: bool = False  # applies to every license that holds an object of its customer

    @property
    def primary(self) -> StripeObject:
        return self.objects[0]

    @property
    def customer(self) -> str | None:
        return self.primary.customer

    # Every id whose binding this event reads or writes (its objects and their links): computed
    # once (the ingest's decision and the binding walks it runs read it several times per event).
    ids: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", frozenset(i for obj in self.objects for i in (obj.id, *obj.links)))


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def stripe_id(value: Any) -> str | None:
    """Stripe fields hold an id, or the expanded object, or null."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_ID or not value.isprintable():
        raise Unprocessable(f"malformed Stripe id {str(value)[:40]!r}")
    return value


def own_id(obj: Any) -> str:
    own = stripe_id(as_dict(obj).get("id"))
    if own is None:
        raise Unprocessable("object without an id")
    return own


def int_field(value: Any) -> int | None:
    """A whole number the columns hold (a timestamp, an amount), or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_CREATED else None


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def link_set(*ids: str | None) -> frozenset[str]:
    return frozenset(i for i in ids if i)


def license_of(metadata: Any) -> str | None:
    value = as_dict(metadata).get("license_id")
    if value is None or value == "":
        return None
    return valid_license_id(value)


def valid_license_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_LICENSE_ID or not value.isprintable():
        raise BadLicenseId(f"license_id must be 1-{MAX_LICENSE_ID} printable characters")
    return value


def products_of(items: Any) -> list[str]:
    """Price and product ids of subscription items, invoice lines or Checkout line items."""
    found: set[str] = set()
    for item in as_dict(items).get("data") or []:
        item = as_dict(item)
        pricing = as_dict(as_dict(item.get("pricing")).get("price_details"))
        for price in (item.get("price"), item.get("plan"), pricing):
            price = as_dict(price) if isinstance(price, dict) else {"id": price}
            for key in ("id", "price", "product"):
                value = price.get(key)
                value = value.get("id") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    found.add(value)
    return sorted(found)


def pays_a_period(lines: Any) -> bool:
    """Whether an invoice has a subscription line that is not a proration: the period itself, not a
    change within it (since 2025-03-31 `parent.subscription_item_details.proration`, before
    `type: subscription` and `proration`)."""
    for line in as_dict(lines).get("data") or []:
        line = as_dict(line)
        parent = as_dict(line.get("parent"))
        if parent:
            details = as_dict(parent.get("subscription_item_details"))
            if parent.get("type") == "subscription_item_details" and details.get("proration") is False:
                return True
        elif line.get("type") == "subscription" and line.get("proration") is False:
            return True
    return False


def machine_count(value: Any) -> int | None:
    """A metadata value (Stripe keeps strings) as a machine count, or None."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 6:
        return int(value)
    return None


def machine_limits(metadata: Any, items: Any) -> dict[str, int]:
    """`max_machines` from the object's own metadata and `price_max_machines` from its prices'
    (subscription items, expanded Checkout line items), when they say so: nothing otherwise, so
    that the state of an object without them is what it always was (broker.licensing reads them)."""
    found: dict[str, int] = {}
    if (own := machine_count(as_dict(metadata).get("max_machines"))) is not None:
        found["max_machines"] = own
    prices = [
        n
        for item in as_dict(items).get("data") or []
        if (n := machine_count(as_dict(as_dict(as_dict(item).get("price")).get("metadata")).get("max_machines")))
        is not None
    ]
    if prices:
        found["price_max_machines"] = max(prices)
    return found
