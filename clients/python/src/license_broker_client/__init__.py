"""The license-broker client for Python desktop apps: follow a license live over SSE, and
unlock offline on a signed lease until it expires."""

from __future__ import annotations

from license_broker_client.cache import LeaseCache
from license_broker_client.client import LicenseClient, Unauthorized
from license_broker_client.leases import InvalidLease, Lease, LeaseVerifier, key_id

__all__ = ["InvalidLease", "Lease", "LeaseCache", "LeaseVerifier", "LicenseClient", "Unauthorized", "key_id"]
