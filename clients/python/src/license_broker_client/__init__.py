"""The license-broker client for Python desktop apps: follow a license live over SSE, and
unlock offline on a signed lease (verified with the keys pinned in the app) until it expires."""

from __future__ import annotations

from license_broker_client.cache import LeaseCache
from license_broker_client.client import LicenseClient, Status, TokenSource, Trust, Unauthorized
from license_broker_client.holder import LeaseHolder
from license_broker_client.keys import InvalidKey, key_id
from license_broker_client.leases import DEFAULT_MAX_SKEW, InvalidLease, Lease, LeaseExpired, LeaseVerifier
from license_broker_client.watermark import Mark, Watermark

__all__ = [
    "DEFAULT_MAX_SKEW",
    "InvalidKey",
    "InvalidLease",
    "Lease",
    "LeaseCache",
    "LeaseExpired",
    "LeaseHolder",
    "LeaseVerifier",
    "LicenseClient",
    "Mark",
    "Status",
    "TokenSource",
    "Trust",
    "Unauthorized",
    "Watermark",
    "key_id",
]
