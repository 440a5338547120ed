"""docs/protocol.md against the code it describes, so that a client written from it in another
language meets the broker it describes: every error sentence a route answers and every SSE event
name a stream sends is in it, and its key-check recipe and test vector are the broker's."""

from __future__ import annotations

import re

from broker.licensing import keys
from tests.support.processes import ROOT

PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
# Where the routes answer from. Development mode's routes (license_broker/dev.py) are not part of
# the protocol.
SOURCES = [*sorted((ROOT / "stream").glob("*.py")), *sorted((ROOT / "webhook").glob("*.py")),
           *sorted((ROOT / "broker" / "web").glob("*.py")), ROOT / "broker" / "wire.py"]  # fmt: skip
_ERROR = re.compile(
    r'"error": "([^"{]+)"|\berror\("([^"]+)", \d{3}|\bpublic = "([^"]+)"|reason = "([^"]+)" if'
    r'|message = "([^"]+)"|_response\(b"\d{3} [^"]+", b"([^"]+)"\)'
)


def test_every_error_sentence_the_routes_answer_is_in_the_protocol() -> None:
    found = {next(g for g in match.groups() if g) for path in SOURCES for match in _ERROR.finditer(path.read_text())}
    found |= {"too many streams for this license"}  # the other half of StreamRefused's reason
    assert len(found) >= 20, found
    missing = sorted(sentence for sentence in found if sentence not in PROTOCOL)
    assert missing == []


def test_every_event_name_the_streams_send_is_in_the_protocol() -> None:
    pattern = re.compile(r'b"event: ([a-z_]+)|_named\(b"([a-z_]+)"')
    sent = {a or b for path in SOURCES for a, b in pattern.findall(path.read_text())}
    assert {"lease", "token", "waiting", "license", "timeout"} <= sent
    assert [name for name in sorted(sent) if f"event: {name}" not in PROTOCOL] == []


def test_the_key_check_recipe_and_its_test_vector_are_the_brokers() -> None:
    generator = re.search(r"the generator's coefficients, highest degree first, are `\[([0-9, ]+)\]`", PROTOCOL)
    assert generator and [int(c) for c in generator.group(1).split(",")] == keys._G
    vector = re.search(r"Test vector: `([0-9A-Z-]+)` is the symbols `([0-9 |\n]+)`", PROTOCOL)
    assert vector
    symbols = [int(s) for s in vector.group(2).replace("|", " ").split()]
    key = keys.normalize(vector.group(1))
    assert [keys.ALPHABET.index(c) for c in key] == symbols
    remainder = re.search(r"followed by `0 0 0 0` is\s+`([0-9 ]+)`", PROTOCOL)
    assert remainder and keys._remainder([*symbols[:21], 0, 0, 0, 0]) == [int(s) for s in remainder.group(1).split()]
    assert symbols[21:] == [int(s) for s in remainder.group(1).split()]
