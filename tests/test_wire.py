"""The event log's wire bytes: encoded once, read back as they are, parsed without decoding."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from broker.storage.eventlog import LicenseEvent, encode_event
from broker.storage.licenses import initial_state

WHEN = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize("license_id", ["lic_1", 'lic_"quoted",seq":9', "lic_\u00e9\u4e2d", "lic_\\"])
@pytest.mark.parametrize("recorded_at", [WHEN, None])
def test_from_wire_reads_what_from_json_reads_without_decoding(license_id: str, recorded_at: datetime | None) -> None:
    data = encode_event(
        license_id,
        42,
        initial_state(),
        stripe_event_id="evt_1",
        stripe_event_type="customer.subscription.updated",
        occurred_at=WHEN,
        recorded_at=recorded_at,
    )
    assert LicenseEvent.from_wire(license_id, data) == LicenseEvent.from_json(data)
    assert LicenseEvent.from_wire(license_id, data).recorded_at == (recorded_at.timestamp() if recorded_at else None)


def test_from_wire_falls_back_to_decoding_a_message_of_another_shape() -> None:
    other_order = orjson.dumps({"seq": 7, "license_id": "lic_1", "recorded_at": None, "status": "active"})
    assert LicenseEvent.from_wire("lic_1", other_order) == LicenseEvent("lic_1", 7, other_order)
    # A message of another license is read as what it is (the hub drops it).
    data = encode_event(
        "lic_2", 3, initial_state(), stripe_event_id=None, stripe_event_type=None, occurred_at=None, recorded_at=WHEN
    )
    assert LicenseEvent.from_wire("lic_1", data).license_id == "lic_2"
