"""The wire format of a license event, in one place: its bytes, their parse, its SSE frame.

An event is one line of JSON, encoded once (`encode_event`) when its transaction writes it, and
then never re-encoded:

- stored as it is: `subscription_event_logs.data` holds these bytes as text (orjson writes UTF-8;
  the SQL readers in broker.storage.eventlog and broker.transports.livecheck `.encode()` it back);
- published as it is on the license's channel (broker.transports: Redis, or in-process);
- sent as it is, as the `data:` of an SSE event whose `id:` is its seq (`event_frame`): one
  `data:` line is enough because orjson never writes a raw newline or carriage return.

Byte positions. `encode_event` writes `license_id`, `seq` and `recorded_at` first, in that order,
so that `read_head` gets the seq and commit time of a message off the wire without decoding the
JSON (`decode`, once per message per process, never per client). A message of another shape (a
row written before that order was fixed, a forgery) is decoded in full (`parse`). The rest of the
event is parsed at most once per event per process, when something needs it (`LicenseEvent.fields`:
the claims of a lease).

The license's channel also carries notices (`notice`), which are not events: they ask the stream
processes that follow the license to look at its machines in the database now (broker.licensing.
watch), rather than at their next sweep. One is delivered as a LicenseEvent of seq NOTICE_SEQ and
never stored, replayed or sent to a client; being only a prompt to read the database, a forged one
ends nothing.

The SSE frames of the desktop stream and of the activation page are built here too (docs/protocol.md
describes them to clients); stream.sse sends them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypedDict, TypeVar, cast, dataclass_transform

import orjson

if TYPE_CHECKING:
    from broker.storage.licenses import LicenseState

# The transports' logger: a dropped message is a transport's concern.
log = logging.getLogger("broker.transports")

NOTICE_SEQ = -1
_NOTICE_PREFIX = b'{"notice":'
_RECORDED_AT = b',"recorded_at":'
# Where recorded_at's closing quote must be, counted from the comma before it: the longest
# isoformat() of an aware datetime is 42 characters ("2026-11-28T10:00:00.123456+05:30:00.123456").
_HEAD_WINDOW = len(_RECORDED_AT) + 1 + 42 + 1


class EventFields(TypedDict):
    """An event's JSON, decoded (what `encode_event` writes)."""

    license_id: str
    seq: int
    recorded_at: str | None  # ISO 8601; null for seq 0, the state of a license never changed
    status: str
    entitled: bool
    stripe_event_id: str | None
    stripe_event_type: str | None
    occurred_at: str | None
    state: LicenseState


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def _frozen(cls: type[_T]) -> type[_T]:
    """A frozen dataclass to type checkers, a plain one at run time: a frozen dataclass's __init__
    pays an object.__setattr__ per field (0.7 us against 0.2 us an event here), and an event is
    made for every message off the wire and every row read from the log."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@_frozen
class LicenseEvent:
    """One event of one license: `data` is its wire bytes (`encode_event`), exactly as stored,
    published and streamed."""

    license_id: str
    seq: int
    data: bytes
    # When the transaction wrote it (epoch seconds), for the commit-to-delivery lag; None when unknown.
    recorded_at: float | None = None
    # `data` decoded by the first `fields()`: the hub hands the same object to every client.
    _fields: EventFields | None = field(default=None, init=False, repr=False, compare=False)

    def fields(self) -> EventFields:
        """`data` decoded, once per event, and shared: to be read, never changed."""
        fields = self._fields
        if fields is None:
            fields = cast(EventFields, orjson.loads(self.data))
            object.__setattr__(self, "_fields", fields)  # frozen to the type checker
        return fields


def encode_event(
    license_id: str,
    seq: int,
    state: LicenseState,
    *,
    stripe_event_id: str | None,
    stripe_event_type: str | None,
    occurred_at: datetime | None,
    recorded_at: datetime | None = None,
) -> bytes:
    """The event's wire bytes: encoded once, then stored, published and streamed as they are."""
    # The first three keys stay first, in this order: read_head reads them without decoding.
    return orjson.dumps(
        {
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
    )


def read_head(license_id: str, data: bytes) -> tuple[int, float | None] | None:
    """The seq and recorded_at (epoch seconds, or None) of an event of license `license_id`,
    read from their byte positions without decoding the JSON; None when `data` does not start
    as `encode_event` starts an event of that license."""
    prefix = b'{"license_id":%s,"seq":' % orjson.dumps(license_id)
    if not data.startswith(prefix):
        return None
    start = len(prefix)
    end = data.find(b",", start)
    seq = data[start:end]
    if end < 0 or not seq.isdigit() or not data.startswith(_RECORDED_AT, end):
        return None
    value = end + len(_RECORDED_AT)
    if data[value : value + 1] != b'"':
        return (int(seq), None) if data.startswith(b"null,", value) else None
    close = data.find(b'"', value + 1, end + _HEAD_WINDOW)
    if close < 0:
        return None
    return int(seq), datetime.fromisoformat(data[value + 1 : close].decode()).timestamp()


def parse(data: bytes) -> LicenseEvent:
    """An event from its bytes, decoded in full (the decoded JSON is kept: `fields`). Raises
    ValueError, KeyError or TypeError when `data` is not an event."""
    fields = orjson.loads(data)
    if not isinstance(fields, dict):
        raise TypeError(f"an event is a JSON object, not {type(fields).__name__}")
    recorded = fields.get("recorded_at")
    recorded_at = datetime.fromisoformat(recorded).timestamp() if recorded else None
    event = LicenseEvent(str(fields["license_id"]), int(fields["seq"]), data, recorded_at)
    object.__setattr__(event, "_fields", fields)
    return event


def decode(license_id: str, payload: bytes) -> LicenseEvent | None:
    """What a message on license `license_id`'s channel carries: an event, a notice (seq
    NOTICE_SEQ), or None (logged) when it carries neither or is another license's event. Read
    once, where it comes off the wire, from its byte positions when it has the usual shape."""
    if payload.startswith(_NOTICE_PREFIX):
        return LicenseEvent(license_id, NOTICE_SEQ, payload)
    try:
        if (head := read_head(license_id, payload)) is not None:
            return LicenseEvent(license_id, head[0], payload, head[1])
        event = parse(payload)
    except Exception:  # whatever a malformed message raises, it must not stop the subscriber
        log.warning("dropped a malformed message for license %s", license_id)
        return None
    if event.license_id != license_id:
        log.warning("dropped a message of license %s sent for license %s", event.license_id, license_id)
        return None
    return event


def notice(license_id: str) -> bytes:
    """The message that asks the processes following the license to look at its machines."""
    return b'{"notice":"machines","license_id":%s}' % orjson.dumps(license_id)


def add_member(data: bytes, name: str, value: str) -> bytes:
    """`data` (a JSON object, as `encode_event` writes one) with one more member at its end, without
    decoding it: GET /api/licenses/{id} answers the stored state plus its `lease`."""
    if not data.endswith(b"}"):
        raise ValueError("not a JSON object")
    sep = b"," if len(data) > 2 else b""
    return b"%s%s%s:%s}" % (data[:-1], sep, orjson.dumps(name), orjson.dumps(value))


# SSE frames (https://html.spec.whatwg.org/multipage/server-sent-events.html). `data` is always one
# line of JSON written by orjson, which never writes a newline, so one `data:` field is enough.


def event_frame(event: LicenseEvent) -> bytes:
    """A state event: `id:` its seq (the client's Last-Event-ID), `data:` its bytes; no `event:`
    line (SSE's type `message`)."""
    return b"id: %d\ndata: %s\n\n" % (event.seq, event.data)


def named_frame(name: bytes, data: bytes) -> bytes:
    """A named event without `id:`: EventSource's onmessage does not see it, and the client's
    Last-Event-ID stays the seq of the last state event (an id-less event leaves it unchanged)."""
    return b"event: %s\ndata: %s\n\n" % (name, data)


def lease_frame(token: str, seq: int, exp: int) -> bytes:
    """`event: lease`: the signed lease of the state of seq `seq`, valid until `exp`."""
    return b"event: lease\ndata: %s\n\n" % orjson.dumps({"lease": token, "seq": seq, "exp": exp})


def token_frame(token: str, exp: int, machine_id: str) -> bytes:
    """`event: token`: a machine's renewed token."""
    return b"event: token\ndata: %s\n\n" % orjson.dumps({"token": token, "exp": exp, "machine_id": machine_id})


def retry_frame(retry_ms: int) -> bytes:
    """The reconnection delay hint that opens a stream."""
    return b"retry: %d\n\n" % retry_ms


# A comment: keeps proxies from closing an idle stream; clients ignore it.
PING = b": ping\n\n"
