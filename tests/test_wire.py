"""The wire format (broker.wire): an event's bytes round-trip through every reading of them (the
byte positions, the full parse, the stored text) and its SSE frame through a standard SSE parser."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import EventSource, ServerSentEvent
from hypothesis import given
from hypothesis import strategies as st

from broker import wire
from broker.storage.eventlog import log_entry
from broker.storage.licenses import LicenseState, initial_state
from broker.wire import NOTICE_SEQ, LicenseEvent, decode, encode_event, parse, read_head

WHEN = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)


def sse(stream: bytes) -> list[ServerSentEvent]:
    """`stream` read by httpx-sse, as a client reads the broker's stream; without the blocks that
    carry no data (`retry:` alone, a comment), which httpx-sse hands on but an EventSource, as the
    spec says, does not dispatch."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream)
    return [event for event in EventSource(response).iter_sse() if event.data]


# Any text JSON can carry (orjson refuses lone surrogates, which no str from JSON holds), control
# characters and line separators included: none of them may reach the frame as a raw newline.
texts = st.text(st.characters(codec="utf-8"), max_size=30)
offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(9998, 12, 30), timezones=offsets)


def _state(status: str, entitled: bool, kind: str | None, features: list[str], end: str | None) -> LicenseState:
    state = initial_state()
    state["status"], state["entitled"], state["kind"], state["features"] = status, entitled, kind, features
    state["current_period_end"] = state["trial_end"] = end
    return state


states = st.builds(
    _state,
    texts,
    st.booleans(),
    st.sampled_from([None, "subscription", "perpetual", "trial"]),
    st.lists(texts, max_size=3),
    st.none() | moments.map(datetime.isoformat),
)


@given(
    license_id=texts,
    seq=st.integers(0, 2**63 - 1),
    state=states,
    stripe_event_id=st.none() | texts,
    stripe_event_type=st.none() | texts,
    occurred_at=st.none() | moments,
    recorded_at=st.none() | moments,
)
def test_an_event_round_trips_through_its_bytes_the_log_and_its_sse_frame(
    license_id: str,
    seq: int,
    state: LicenseState,
    stripe_event_id: str | None,
    stripe_event_type: str | None,
    occurred_at: datetime | None,
    recorded_at: datetime | None,
) -> None:
    data = encode_event(
        license_id,
        seq,
        state,
        stripe_event_id=stripe_event_id,
        stripe_event_type=stripe_event_type,
        occurred_at=occurred_at,
        recorded_at=recorded_at,
    )
    stamp = recorded_at.timestamp() if recorded_at else None
    expected = LicenseEvent(license_id, seq, data, stamp)

    # The byte positions read_head relies on: license id, seq, recorded_at, first and in this order.
    head = b'{"license_id":%s,"seq":%d,"recorded_at":' % (orjson.dumps(license_id), seq)
    assert data.startswith(head)
    assert read_head(license_id, data) == (seq, stamp)  # the fast path, never the fallback
    # A message off the wire, and the full parse, give the same event.
    assert decode(license_id, data) == expected
    assert parse(data) == expected
    assert parse(data).fields() == {
        "license_id": license_id,
        "seq": seq,
        "recorded_at": recorded_at.isoformat() if recorded_at else None,
        "status": state["status"],
        "entitled": state["entitled"],
        "stripe_event_id": stripe_event_id,
        "stripe_event_type": stripe_event_type,
        "occurred_at": occurred_at.isoformat() if occurred_at else None,
        "state": state,
    }
    assert decode(license_id, data).fields() == parse(data).fields()  # type: ignore[union-attr]

    # The log: the row stores the same bytes as text, read back as they are.
    if occurred_at is not None and recorded_at is not None:
        row, appended = log_entry(
            license_id,
            seq,
            state,
            stripe_event_id=stripe_event_id,
            stripe_event_type=stripe_event_type,
            occurred_at=occurred_at,
            recorded_at=recorded_at,
        )
        assert row["data"].encode() == appended.data == data
        assert appended == expected

    # The SSE frame: one line of data, which a standard parser gives back with its seq as id.
    assert b"\n" not in data and b"\r" not in data
    (frame,) = sse(wire.event_frame(expected))
    assert (frame.id, frame.event, frame.data) == (str(seq), "message", data.decode())
    assert orjson.loads(frame.data) == orjson.loads(data)


@given(token=st.from_regex(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", fullmatch=True),
       seq=st.integers(0, 2**63 - 1), exp=st.integers(0, 2**40), machine_id=texts)  # fmt: skip
def test_a_stream_of_every_frame_parses_back_in_order(token: str, seq: int, exp: int, machine_id: str) -> None:
    event = LicenseEvent("lic_1", seq, encode_event("lic_1", seq, initial_state(), stripe_event_id=None,
                                                    stripe_event_type=None, occurred_at=None))  # fmt: skip
    stream = b"".join(
        [
            wire.retry_frame(2500),
            wire.event_frame(event),
            wire.lease_frame(token, seq, exp),
            wire.PING,
            wire.token_frame(token, exp, machine_id),
            wire.named_frame(b"timeout", b"{}"),
        ]
    )
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=wire.retry_frame(2500))
    assert [e.retry for e in EventSource(response).iter_sse()] == [2500]
    state, lease, renewed, timeout = sse(stream)
    assert (state.id, state.event, state.data) == (str(seq), "message", event.data.decode())
    # Named events carry no id: the client's Last-Event-ID stays the state's seq.
    assert (lease.event, lease.id, lease.json()) == ("lease", str(seq), {"lease": token, "seq": seq, "exp": exp})
    assert (renewed.event, renewed.json()) == ("token", {"token": token, "exp": exp, "machine_id": machine_id})
    assert (timeout.event, timeout.data) == ("timeout", "{}")


@pytest.mark.parametrize("license_id", ["lic_1", 'lic_"quoted",seq":9', "lic_\u00e9\u4e2d", "lic_\\"])
@pytest.mark.parametrize("recorded_at", [WHEN, WHEN.replace(microsecond=0), None])
def test_the_byte_positions_read_what_the_full_parse_reads(license_id: str, recorded_at: datetime | None) -> None:
    data = encode_event(license_id, 42, initial_state(), stripe_event_id="evt_1",
                        stripe_event_type="customer.subscription.updated", occurred_at=WHEN,
                        recorded_at=recorded_at)  # fmt: skip
    assert read_head(license_id, data) is not None
    assert decode(license_id, data) == parse(data)
    assert parse(data).recorded_at == (recorded_at.timestamp() if recorded_at else None)


def test_recorded_at_is_read_whole_whatever_its_offset() -> None:
    # The longest isoformat(): microseconds and an offset with minutes. Reading a fixed number of
    # bytes once cut "+05:30" to "+05", half an hour off.
    when = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    data = encode_event("lic_1", 1, initial_state(), stripe_event_id=None, stripe_event_type=None,
                        occurred_at=None, recorded_at=when)  # fmt: skip
    assert read_head("lic_1", data) == (1, when.timestamp())


def test_a_message_of_another_shape_is_decoded_in_full() -> None:
    # Rows written before the key order was fixed: read, in full.
    other_order = orjson.dumps({"seq": 7, "license_id": "lic_1", "recorded_at": None, "status": "active"})
    assert read_head("lic_1", other_order) is None
    assert decode("lic_1", other_order) == LicenseEvent("lic_1", 7, other_order)
    assert decode("lic_1", other_order).fields()["status"] == "active"  # type: ignore[union-attr]


def test_a_message_of_another_license_or_none_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.transports")
    data = encode_event("lic_2", 3, initial_state(), stripe_event_id=None, stripe_event_type=None,
                        occurred_at=None, recorded_at=WHEN)  # fmt: skip
    assert read_head("lic_1", data) is None
    assert parse(data).license_id == "lic_2"
    assert decode("lic_1", data) is None
    with pytest.raises(TypeError, match="an event is a JSON object, not list"):
        parse(b"[1, 2]")
    for malformed in [b"", b"not json", b"[1, 2]", b'{"license_id":"lic_1"}', b'{"license_id":"lic_1","seq":"x"}']:
        assert decode("lic_1", malformed) is None
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "dropped a message of license lic_2 sent for license lic_1"
    assert messages[1:] == ["dropped a malformed message for license lic_1"] * 5


@pytest.mark.parametrize("license_id", ["lic_1", 'lic_"quoted"', "lic_\u00e9"])
def test_a_notice_is_read_as_a_notice_of_its_license(license_id: str) -> None:
    message = wire.notice(license_id)
    assert orjson.loads(message) == {"notice": "machines", "license_id": license_id}
    assert decode(license_id, message) == LicenseEvent(license_id, NOTICE_SEQ, message)


def test_fields_are_decoded_once_per_event() -> None:
    data = encode_event("lic_1", 5, initial_state(), stripe_event_id=None, stripe_event_type=None,
                        occurred_at=None, recorded_at=WHEN)  # fmt: skip
    event = decode("lic_1", data)
    assert event is not None
    assert event.fields() is event.fields()
    parsed = parse(data)
    assert parsed.fields() is parsed.fields()
    assert event == parsed  # the decoded fields take no part in equality


@pytest.mark.parametrize("data", [b"{}", b'{"license_id":"lic_1","seq":1}'])
def test_a_member_is_added_without_decoding(data: bytes) -> None:
    extended = wire.add_member(data, "lease", 'a.b"c')
    expected: dict[str, Any] = {**orjson.loads(data), "lease": 'a.b"c'}
    assert orjson.loads(extended) == expected
    with pytest.raises(ValueError, match=r"^not a JSON object$"):
        wire.add_member(b"[1]", "lease", "x")


def test_the_byte_positions_read_recorded_at_only_where_and_as_the_full_parse_reads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A message that starts like an event but whose third key is another of the same length, or
    whose recorded_at is no string: the byte positions read nothing from it, and the message is
    what its full parse makes of it (another key's time is not the event's; a number is refused)."""
    caplog.set_level(logging.WARNING, logger="broker.transports")
    other_key = b'{"license_id":"lic_1","seq":7,"recorded_on":"2020-01-01T00:00:00+00:00","recorded_at":null}'
    assert len(b',"recorded_on":') == len(b',"recorded_at":')
    assert read_head("lic_1", other_key) is None
    assert decode("lic_1", other_key) == parse(other_key) == LicenseEvent("lic_1", 7, other_key, None)
    number = b'{"license_id":"lic_1","seq":7,"recorded_at":1764331200,"status":"active"}'
    assert read_head("lic_1", number) is None
    assert decode("lic_1", number) is None
    assert [r.getMessage() for r in caplog.records] == ["dropped a malformed message for license lic_1"]


def test_a_message_of_the_usual_shape_is_read_from_its_byte_positions_and_a_parse_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`decode` of an event as `encode_event` writes it never parses the JSON (once per message per
    process: the byte positions are the fast path), and a full parse keeps what it decoded for
    `fields` rather than decoding again."""
    data = encode_event("lic_1", 5, initial_state(), stripe_event_id=None, stripe_event_type=None,
                        occurred_at=None, recorded_at=WHEN)  # fmt: skip
    parsed = parse(data)

    def refused(*args: Any) -> Any:
        raise AssertionError("decoded again")

    monkeypatch.setattr(wire, "parse", refused)
    monkeypatch.setattr(wire.orjson, "loads", refused)
    assert decode("lic_1", data) == LicenseEvent("lic_1", 5, data, WHEN.timestamp())
    assert parsed.fields()["seq"] == 5
