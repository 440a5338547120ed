"""A license key as the buyer types it, checked here before it is sent (docs/protocol.md, "The
license key"): a typo is found at once, offline, and does not count against the broker's limit on
failed attempts. The broker makes the same check; tests compare the two on every typo of a key.

25 characters of Crockford's base32 (no I, L, O, U) in any case, dashes and spaces ignored, O read
as 0 and I, L as 1; the last 4 are Reed-Solomon check symbols over GF(32) (x^5 + x^2 + 1, roots
a^1..a^4), so any 4 wrong characters, or 2 swapped, fail the check."""

from __future__ import annotations

import re

from license_broker_client.errors import MalformedLicenseKey

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = 25
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_READ_AS = str.maketrans({"O": "0", "I": "1", "L": "1"})
_IGNORED = re.compile(r"[\s\-\u2010-\u2015\u2212]+")

_EXP = [0] * 62
_LOG = [0] * 32
_x = 1
for _i in range(31):
    _EXP[_i] = _EXP[_i + 31] = _x
    _LOG[_x] = _i
    _x = (_x << 1) ^ (0b100101 if _x & 16 else 0)


def _syndromes_are_zero(symbols: list[int]) -> bool:
    """The key, as a polynomial (first character the highest power), vanishes at a^1..a^4: it is a
    codeword of the generator (x - a)(x - a^2)(x - a^3)(x - a^4)."""
    for root in range(1, 5):
        value = 0
        for symbol in symbols:  # Horner, in GF(32)
            value = (_EXP[_LOG[value] + root] if value else 0) ^ symbol
        if value:
            return False
    return True


def normalize_license_key(text: str) -> str:
    """The key as the broker reads it, shown in five groups of five (`PY9W9-WM8F2-...`), or
    MalformedLicenseKey (nothing is sent)."""
    if not isinstance(text, str) or len(text) > 100:
        raise MalformedLicenseKey("malformed key: too long")
    key = _IGNORED.sub("", text).upper().translate(_READ_AS)
    if len(key) != LENGTH:
        raise MalformedLicenseKey(f"malformed key: {LENGTH} characters expected, {len(key)} given")
    try:
        symbols = [_VALUE[c] for c in key]
    except KeyError:
        raise MalformedLicenseKey("malformed key: a character that is not in a key") from None
    if not _syndromes_are_zero(symbols):
        raise MalformedLicenseKey("malformed key: check it for a typo")
    return "-".join(key[i : i + 5] for i in range(0, LENGTH, 5))
