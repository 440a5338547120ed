"""What can go wrong talking to the broker, one class per thing an app does differently about it.

    BrokerError                    any refusal or failure; `status` (None: no answer), `code`
    ├── Unauthorized               401/403: a new token (or the key) is needed; retrying will not help
    │   └── MachineReleased        401 "machine released": this machine was deactivated: ask for the key
    ├── NotActivated               no machine activated here yet (no request was made)
    ├── MalformedLicenseKey        400: a typo (found here before sending, or by the broker)
    ├── InvalidLicenseKey          403: no license has this key (never issued, or replaced)
    ├── MachineLimitReached        409: `machines` in use, `max`: offer to release one
    ├── MachineNotFound            404: not an active machine of this license (released already)
    ├── RateLimited                429: too many attempts (checkouts, trials, ...); `retry_after` seconds
    ├── NotOffered                 404: the seller has not turned it on (`feature`: "checkout",
    │                              "trials", "portal" or "keys"): hide the button
    ├── UnknownPrice               400: a price not among the seller's (`prices`: the ones offered)
    ├── AlreadyPaid                409: the license is paid for already: offer the portal
    ├── TrialUsed                  409: this machine has had its trial (one per machine, ever)
    ├── NoCustomer                 409: nothing bought yet, so no billing portal: offer Buy
    ├── CheckoutExpired            the checkout ended unpaid (no request failed: see Purchase)
    └── BrokerUnavailable          no answer, or 5xx; `retry_after` when the broker gave one
        └── StripeRefused          502 "Stripe refused": the seller's Stripe configuration

The broker's body is in `body` (its `error` string is the message)."""

from __future__ import annotations

from typing import Any

import httpx

from license_broker_client.machines import Machine


class BrokerError(Exception):
    code = "broker_error"

    def __init__(self, message: str, *, status: int | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


class Unauthorized(BrokerError):
    """401/403: a new token is needed; reconnecting with this one would never succeed."""

    code = "unauthorized"


class MachineReleased(Unauthorized):
    """This machine was released (deactivated) on the broker: its token is refused and the client
    has forgotten it and its lease. Ask the user for the key again."""

    code = "machine_released"


class NotActivated(BrokerError):
    code = "not_activated"


class MalformedLicenseKey(BrokerError):
    code = "malformed_key"


class InvalidLicenseKey(BrokerError):
    code = "invalid_key"


class MachineLimitReached(BrokerError):
    """The license holds its `max` machines already: `machines` lists them (oldest first), so that
    the app can offer to release one (`release(machine.id, key=key)`) and activate again."""

    code = "machine_limit_reached"

    def __init__(self, message: str, *, status: int | None = 409, body: dict[str, Any] | None = None) -> None:
        super().__init__(message, status=status, body=body)
        self.machines = tuple(Machine.of(m) for m in self.body.get("machines") or ())
        limit = self.body.get("max")
        self.max: int | None = limit if isinstance(limit, int) else None


class MachineNotFound(BrokerError):
    code = "no_such_machine"


class RateLimited(BrokerError):
    code = "rate_limited"

    def __init__(self, message: str, *, status: int | None = 429, body: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class BrokerUnavailable(BrokerError):
    code = "unavailable"

    def __init__(self, message: str, *, status: int | None = None, body: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class StripeRefused(BrokerUnavailable):
    """502 "Stripe refused: ...": the seller's Stripe account refused (a bad key, a price it does
    not have). Not the app's to fix: report it. A BrokerUnavailable, as any 5xx is."""

    code = "stripe_refused"


class NotOffered(BrokerError):
    """404 "... off on this server": the seller has not turned this on (`feature`: "checkout",
    "trials", "portal", or "keys": license keys, and with them activation, machines and buying
    from the app). Retrying will not help: hide what needs it. A BrokerError, as 0.3 raised the
    keys' refusal."""

    code = "not_offered"

    def __init__(self, message: str, *, status: int | None = 404, body: dict[str, Any] | None = None,
                 feature: str = "") -> None:  # fmt: skip
        super().__init__(message, status=status, body=body)
        self.feature = feature


class UnknownPrice(BrokerError):
    """400 "price: one of ...": `prices` are the ones the seller offers."""

    code = "unknown_price"

    def __init__(self, message: str, *, status: int | None = 400, body: dict[str, Any] | None = None) -> None:
        super().__init__(message, status=status, body=body)
        listed = message.partition("one of ")[2]
        self.prices = tuple(p.strip() for p in listed.split(",") if p.strip())


class AlreadyPaid(BrokerError):
    """409: the license of this machine is paid for already: offer `portal()` instead."""

    code = "already_paid"


class TrialUsed(BrokerError):
    """409: this machine has had its trial (one per machine, ever: a reinstall too)."""

    code = "trial_used"


class NoCustomer(BrokerError):
    """409: the license has no Stripe customer yet (a trial, an unpaid checkout): nothing to manage
    in the billing portal; offer `buy()` instead."""

    code = "no_customer"


class CheckoutExpired(BrokerError):
    """The checkout ended unpaid: its `expires_at` (epoch seconds) passed, or the broker removed
    the pending license it made (its machine released). Nothing was bought; `buy()` again."""

    code = "checkout_expired"

    def __init__(self, message: str, *, expires_at: float | None = None) -> None:
        super().__init__(message)
        self.expires_at = expires_at


# What the 404 of each offer that is off says (docs/protocol.md, "Errors").
_OFF = {
    "buying from the app": "checkout",
    "trials": "trials",
    "the billing portal": "portal",
    "license keys": "keys",  # activation and machines; buying and trials need them too
}


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the broker never sends the HTTP-date form), capped at an hour."""
    try:
        seconds = float(value) if value else -1.0
    except ValueError:
        return None
    return min(seconds, 3600.0) if seconds >= 0 else None


def error_of(response: httpx.Response, body: Any) -> BrokerError:
    """The error for a refusal of the broker's (`body`: its JSON, if any)."""
    data: dict[str, Any] = body if isinstance(body, dict) else {}
    status = response.status_code
    message = str(data.get("error") or f"HTTP {status}")
    retry = retry_after_seconds(response.headers.get("retry-after"))
    if status == 400 and message == "malformed key":
        return MalformedLicenseKey("malformed key: check it for a typo", status=status, body=data)
    if status == 403 and message == "invalid key":
        return InvalidLicenseKey("invalid key: no license has this key (never issued, or replaced)",
                                 status=status, body=data)  # fmt: skip
    if status == 409 and message == "machine limit reached":
        return MachineLimitReached(message, status=status, body=data)
    if status == 401 and message == "machine released":
        return MachineReleased("this machine was released (deactivated): activate it again with the key",
                               status=status, body=data)  # fmt: skip
    if status in (401, 403):
        return Unauthorized(f"{status}: {message}", status=status, body=data)
    if status == 404 and message == "no such machine":
        return MachineNotFound(message, status=status, body=data)
    feature = next((f for prefix, f in _OFF.items() if message.startswith(f"{prefix} ")), None)
    if status == 404 and feature is not None and " off on this server" in message:
        return NotOffered(message, status=status, body=data, feature=feature)
    if status == 400 and message.startswith("price: one of "):
        return UnknownPrice(message, status=status, body=data)
    if status == 409 and message.startswith("this license is paid for already"):
        return AlreadyPaid(message, status=status, body=data)
    if status == 409 and message == "this machine has had its trial":
        return TrialUsed(message, status=status, body=data)
    if status == 409 and message.startswith("this license has no Stripe customer"):
        return NoCustomer(message, status=status, body=data)
    if status == 502 and message.startswith("Stripe refused"):
        return StripeRefused(f"{status}: {message}", status=status, body=data)
    if status == 429:
        return RateLimited(f"{message} (retry after {retry} s)", status=status, body=data, retry_after=retry)
    if status >= 500:
        return BrokerUnavailable(f"{status}: {message}", status=status, body=data, retry_after=retry)
    return BrokerError(f"{status}: {message}", status=status, body=data)
