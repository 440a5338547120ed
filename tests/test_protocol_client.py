"""A client written from docs/protocol.md alone, as someone would in another language: raw HTTP
lines, SSE parsed by hand, the pinned key read from the PEM by its SPKI prefix, the `kid`
computed as the doc says, the lease's Ed25519 signature checked with a bare Ed25519 primitive (no
JOSE library), resume by Last-Event-ID, and the license key's check characters from the doc's
recipe. If the doc left out something a client needs, this test could not be written without
reading the broker's code; it imports nothing of the broker's client side."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.licensing import keys as broker_keys
from broker.signing import leases
from license_broker.embedded import create_app
from tests.support.activations import LEASE_KEYS, keyed_settings
from tests.support.licenses import new_license, post_event, token_for
from tests.support.processes import serving
from webhook.samples import SampleEvents

# -- from "Pinning the key" ----------------------------------------------------------------------

SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pinned_keys(printed: str) -> dict[str, bytes]:
    """What `keys public` printed -> {kid: raw 32-byte key}; comment lines ignored."""
    found = {}
    for body in re.findall(r"-----BEGIN PUBLIC KEY-----(.+?)-----END PUBLIC KEY-----", printed, re.S):
        der = base64.b64decode("".join(body.split()))
        assert len(der) == 44 and der.startswith(SPKI_PREFIX), "not an Ed25519 public key"
        raw = der[len(SPKI_PREFIX) :]
        kid = b64url(hashlib.sha256(f'{{"crv":"Ed25519","kty":"OKP","x":"{b64url(raw)}"}}'.encode()).digest())
        found[kid] = raw
    assert found, "no public key pinned"
    return found


# -- from "Verifying a lease" --------------------------------------------------------------------


def verify_lease(jws: str, pinned: dict[str, bytes], license_id: str, max_skew: int = 300) -> dict[str, Any]:
    head, payload, signature = jws.split(".")
    header = json.loads(unb64url(head))
    assert header["alg"] == "EdDSA"
    raw = pinned[header["kid"]]  # KeyError: not pinned
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(unb64url(signature), f"{head}.{payload}".encode("ascii"))
    except InvalidSignature as exc:
        raise AssertionError("forged") from exc
    claims: dict[str, Any] = json.loads(unb64url(payload))
    assert all(isinstance(claims[c], int) for c in ("seq", "iat", "exp")) and claims["sub"] == license_id
    now = time.time()
    assert claims["iat"] <= now + max_skew and claims["exp"] > now
    return claims


# -- from "Framing" ------------------------------------------------------------------------------


class Events:
    """An SSE body parsed line by line: (fields, event type, data) as the doc's table says."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self.lines = lines
        self.retry: int | None = None
        self.comments: list[str] = []

    async def next(self) -> dict[str, str]:
        event: dict[str, str] = {}
        async for line in self.lines:
            if line == "":
                if "data" in event:
                    return {"event": "message", **event}
                event = {}
            elif line.startswith(":"):
                self.comments.append(line)
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "retry":
                    self.retry = int(value)
                elif name in ("id", "event"):
                    event[name] = value
                elif name == "data":
                    event["data"] = event["data"] + "\n" + value if "data" in event else value
        raise EOFError


@asynccontextmanager
async def stream(client: httpx.AsyncClient, url: str, token: str, last_id: str | None = None) -> AsyncIterator[Events]:
    headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream"}
    if last_id is not None:
        headers["last-event-id"] = last_id
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        yield Events(response.aiter_lines())


# -- from "The license key" ----------------------------------------------------------------------

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
GENERATOR = [1, 30, 6, 9, 17]


def gf_mul(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a & 32:
            a ^= 0b100101
    return product


def key_is_well_formed(text: str) -> bool:
    key = re.sub(r"[\s\-\u2010-\u2015\u2212]", "", text).upper().translate(str.maketrans("OIL", "011"))
    if len(key) != 25 or any(c not in ALPHABET for c in key):
        return False
    remainder = [ALPHABET.index(c) for c in key]
    for i in range(len(remainder) - 4):  # long division by the generator, highest degree first
        coefficient = remainder[i]
        for j in range(1, 5):
            remainder[i + j] ^= gf_mul(GENERATOR[j], coefficient)
    return not any(remainder[-4:])


def test_the_key_check_written_from_the_doc_agrees_with_the_broker() -> None:
    rng = random.Random(7)
    for _ in range(300):
        key = broker_keys.generate()
        typo = list(key)
        typo[rng.randrange(25)] = rng.choice(ALPHABET)
        for candidate in (key, "-".join(key[i : i + 5] for i in range(0, 25, 5)).lower(), "".join(typo)):
            try:
                broker_keys.normalize(candidate)
                expected = True
            except broker_keys.MalformedKey:
                expected = False
            assert key_is_well_formed(candidate) == expected, candidate


async def test_a_client_written_from_the_doc_follows_resumes_and_verifies(sqlite_url: str) -> None:
    license_id = new_license()
    printed = "# kid ... (signs)\n" + leases.public_pem(LEASE_KEYS.signing.public_key())  # `keys public`
    pinned = pinned_keys(printed)
    token = token_for(license_id)
    async with serving(create_app(keyed_settings(sqlite_url))) as url, httpx.AsyncClient(timeout=10) as client:
        events_url = f"{url}/api/licenses/{license_id}/events"
        async with stream(client, events_url, token) as events:
            first = await events.next()
            assert events.retry == 2000  # the retry: hint came first
            state = json.loads(first["data"])
            assert (first["event"], first["id"], state["seq"], state["status"]) == ("message", "0", 0, "none")
            lease = await events.next()
            assert lease["event"] == "lease" and "id" not in lease
            body = json.loads(lease["data"])
            claims = verify_lease(body["lease"], pinned, license_id)
            assert (claims["seq"], claims["entitled"], body["exp"]) == (0, False, claims["exp"])
            # Live: each change, then its lease.
            for event in SampleEvents(license_id).for_action("pay"):
                assert (await post_event(client, url, event)).status_code == 200
            seen: list[dict[str, Any]] = []
            while not any(e["event"] == "lease" and json.loads(e["data"])["seq"] >= 2 for e in seen):
                seen.append(await events.next())
        states = [json.loads(e["data"]) for e in seen if e["event"] == "message"]
        assert [s["seq"] for s in states] == list(range(1, len(states) + 1))
        assert [e["id"] for e in seen if e["event"] == "message"] == [str(s["seq"]) for s in states]
        last = states[-1]
        assert last["entitled"] is True and last["state"]["status"] == "active"
        newest = [json.loads(e["data"]) for e in seen if e["event"] == "lease"][-1]
        assert verify_lease(newest["lease"], pinned, license_id)["entitled"] is True

        # Resume from the first state: exactly the ones after it, then the last one's lease.
        async with stream(client, events_url, token, last_id="1") as events:
            replayed = [await events.next() for _ in range(len(states) - 1)]
            assert [json.loads(e["data"])["seq"] for e in replayed] == [s["seq"] for s in states[1:]]
            lease = await events.next()
            assert lease["event"] == "lease" and json.loads(lease["data"])["seq"] == last["seq"]
        # Resume at the current seq: nothing resent, the lease of that state.
        async with stream(client, events_url, token, last_id=str(last["seq"])) as events:
            assert (await events.next())["event"] == "lease"
        # Ahead of the broker (a restored backup): the current state, its own lower seq as id.
        async with stream(client, events_url, token, last_id="9999") as events:
            assert (await events.next())["id"] == str(last["seq"])

        # The doc's errors, by their exact sentences.
        bad = await client.get(events_url, headers={"authorization": f"Bearer {token}", "last-event-id": "+1"})
        assert (bad.status_code, bad.json()) == (400, {"error": "Last-Event-ID must be a non-negative integer"})
        other = await client.get(events_url, headers={"authorization": f"Bearer {token_for(new_license())}"})
        assert (other.status_code, other.json()) == (403, {"error": "token is for another license"})
        none = await client.get(events_url)
        assert (none.status_code, none.json(), none.headers["www-authenticate"]) == (
            401, {"error": "invalid token"}, "Bearer"
        )  # fmt: skip
