"""The machine a stream was opened by (a machine token): what its leases add, and the renewal of
its token on the stream, so that an app that stays connected never has to activate again."""

from __future__ import annotations

import time

from broker.licensing.machines import machine_claims
from broker.settings import Settings
from broker.signing import tokens
from broker.wire import token_frame


class StreamMachine:
    __slots__ = ("expires_at", "fingerprint", "id", "license_id", "settings")

    def __init__(self, settings: Settings, license_id: str, grant: tokens.Grant) -> None:
        assert grant.machine_id is not None and grant.fingerprint is not None
        self.settings = settings
        self.license_id = license_id
        self.id = grant.machine_id
        self.fingerprint = grant.fingerprint
        self.expires_at = grant.expires_at  # epoch seconds

    def lease_claims(self) -> dict[str, str]:
        return machine_claims(self.id, self.fingerprint)

    def renew_in(self) -> float:
        """Seconds until the token is renewed: once less than half of MACHINE_TOKEN_TTL is left
        (at once for a token already past that)."""
        return self.expires_at - self.settings.machine_token_ttl / 2 - time.time()

    def renew(self) -> bytes:
        """A fresh token for the same machine, as an SSE event; the stream may now last until it
        expires. The machine's row was checked when the stream opened; a release since then ends
        the stream (broker.licensing.watch), and every use of a token checks the row again."""
        token, exp = tokens.mint_machine(self.settings, self.license_id, self.id, self.fingerprint)
        self.expires_at = float(exp)
        return token_frame(token, exp, self.id)
