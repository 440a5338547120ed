"""What buying and trying from the app give it (docs/protocol.md, "Buying, trying and managing
from the app"): a `Purchase` (`LicenseClient.buy()`), the checkout to open in the browser and the
wait for its payment, and a `Trial` (`LicenseClient.start_trial()`). The client decides when a
purchase is paid (its stream's lease, verified and bound to this machine); a Purchase only holds
the outcome."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from license_broker_client.errors import BrokerError
from license_broker_client.leases import Lease

# After a checkout's `expires_at`, how long a payment made in its last moments is still waited
# for (the webhooks of a payment made then take seconds; the JS client waits as long).
EXPIRY_GRACE = 60.0


@dataclass(frozen=True, slots=True)
class Trial:
    """A trial started on this machine: a license of its own, entitled until `trial_end`."""

    license_id: str
    machine_id: str
    trial_end: datetime
    entitled: bool  # the client holds the trial's lease (verified with the pinned keys)

    def seconds_left(self, now: float | None = None) -> float:
        return max(0.0, self.trial_end.timestamp() - (time.time() if now is None else now))

    def days_left(self, now: float | None = None) -> int:
        """Whole days left, rounded up ("3 days left" until the last day ends); 0 once it has ended."""
        return math.ceil(self.seconds_left(now) / 86400)


class Purchase:
    """A checkout made for this machine. Open `checkout_url` in the browser at once, then
    `await purchase.wait()` (or `await purchase`): it returns when the license is paid for, the
    client holding its lease (verified with the pinned keys, issued to this machine; the lease is
    returned, None for a client without a pinned key, which goes by the live state). It raises
    CheckoutExpired when the checkout ended unpaid (`expires_at` passed, or the broker removed the
    license it made for it). The client follows the license's stream while it waits, or, when
    the app iterates the client already, lets that do it. To wait less long, wrap it in
    `asyncio.timeout(...)`: a cancelled wait leaves the purchase open (wait again)."""

    def __init__(
        self,
        license_id: str,
        machine_id: str,
        checkout_url: str,
        expires_at: float,
        *,
        pending: bool,
        follow: Callable[[Purchase], Awaitable[None]],
    ) -> None:
        self.license_id = license_id
        self.machine_id = machine_id
        self.checkout_url = checkout_url
        self.expires_at = expires_at  # epoch seconds: the checkout stops taking payment then
        # A license the checkout made (no license was held before): removed if nobody pays.
        self.pending = pending
        self.grace = EXPIRY_GRACE
        self._follow = follow
        self._outcome: asyncio.Future[Lease | None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "paid" if self.paid else "ended" if self.done() else "open"
        return f"<Purchase {self.license_id} machine {self.machine_id} {state}>"

    @property
    def deadline(self) -> float:
        """When waiting stops (epoch seconds): `expires_at` and a grace for a last-moment payment."""
        return self.expires_at + self.grace

    def done(self) -> bool:
        return self._outcome.done()

    @property
    def paid(self) -> bool:
        return self._outcome.done() and self._outcome.exception() is None

    async def wait(self) -> Lease | None:
        if not self._outcome.done():
            await self._follow(self)
        return self._outcome.result()

    def __await__(self) -> Generator[Any, None, Lease | None]:
        return self.wait().__await__()

    def _resolve(self, lease: Lease | None) -> None:
        if not self._outcome.done():
            self._outcome.set_result(lease)

    def _fail(self, error: BrokerError) -> None:
        if not self._outcome.done():
            self._outcome.set_exception(error)
            self._outcome.exception()  # retrieved: an app that never waits is not warned at exit
