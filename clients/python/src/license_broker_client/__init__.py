"""The license-broker client for Python desktop apps: follow a license live over SSE, and
unlock offline on a signed lease (verified with the keys pinned in the app) until it expires.
Activate with a license key (`LicenseClient(url, app_id=...)`, `activate(key)`), buy or try
from the app (`buy()`, `start_trial()`, `portal()`), or follow a token from the seller's web app."""

from __future__ import annotations

from license_broker_client.cache import LeaseCache
from license_broker_client.client import LicenseClient, Status, TokenSource, Trust
from license_broker_client.errors import (
    AlreadyPaid,
    BrokerError,
    BrokerUnavailable,
    CheckoutExpired,
    InvalidLicenseKey,
    MachineLimitReached,
    MachineNotFound,
    MachineReleased,
    MalformedLicenseKey,
    NoCustomer,
    NotActivated,
    NotOffered,
    RateLimited,
    StripeRefused,
    TrialUsed,
    Unauthorized,
    UnknownPrice,
)
from license_broker_client.fingerprint import MachineIdUnavailable, machine_fingerprint, os_machine_id
from license_broker_client.holder import LeaseHolder
from license_broker_client.keys import InvalidKey, key_id
from license_broker_client.leases import (
    DEFAULT_MAX_SKEW,
    InvalidLease,
    Lease,
    LeaseExpired,
    LeaseVerifier,
    MachineBinding,
)
from license_broker_client.license_keys import normalize_license_key
from license_broker_client.machines import Activation, Machine, MachineFile, MachineList
from license_broker_client.purchases import Purchase, Trial
from license_broker_client.watermark import Mark, Watermark

__all__ = [
    "DEFAULT_MAX_SKEW",
    "Activation",
    "AlreadyPaid",
    "BrokerError",
    "BrokerUnavailable",
    "CheckoutExpired",
    "InvalidKey",
    "InvalidLease",
    "InvalidLicenseKey",
    "Lease",
    "LeaseCache",
    "LeaseExpired",
    "LeaseHolder",
    "LeaseVerifier",
    "LicenseClient",
    "Machine",
    "MachineBinding",
    "MachineFile",
    "MachineIdUnavailable",
    "MachineLimitReached",
    "MachineList",
    "MachineNotFound",
    "MachineReleased",
    "MalformedLicenseKey",
    "Mark",
    "NoCustomer",
    "NotActivated",
    "NotOffered",
    "Purchase",
    "RateLimited",
    "Status",
    "StripeRefused",
    "TokenSource",
    "Trial",
    "TrialUsed",
    "Trust",
    "Unauthorized",
    "UnknownPrice",
    "Watermark",
    "key_id",
    "machine_fingerprint",
    "normalize_license_key",
    "os_machine_id",
]
