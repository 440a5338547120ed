"""license_broker_client's machine side without a server: the fingerprint (from each system's
machine id, salted and hashed), the license key checked before sending, leases bound to a
machine (a copy on another computer verifies nothing), the activation file, and the errors."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from license_broker_client import (
    AlreadyPaid,
    BrokerError,
    BrokerUnavailable,
    InvalidLease,
    InvalidLicenseKey,
    LeaseVerifier,
    LicenseClient,
    MachineBinding,
    MachineFile,
    MachineIdUnavailable,
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
    key_id,
    machine_fingerprint,
    normalize_license_key,
    os_machine_id,
)
from license_broker_client.errors import error_of
from license_broker_client.machines import Credentials

LICENSE = "lic_machine_test"
NOW = 1_900_000_000.0
OFFLINE = "http://127.0.0.1:9"  # nothing listens there
APP = "com.example.draw"
# A key the broker would issue (its check characters hold): PY9W9-WM8F2-WT0QD-EYJKS-7YMED is docs'.
KEY = "PY9W9-WM8F2-WT0QD-EYJKS-7YMED"


def pem(key: Ed25519PrivateKey) -> str:
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public.decode()


def bound_lease(key: Ed25519PrivateKey, machine: str | None, fingerprint: str | None, *, seq: int = 3) -> str:
    claims: dict[str, Any] = {"sub": LICENSE, "seq": seq, "status": "active", "entitled": True, "features": [],
                              "current_period_end": None, "iat": int(NOW), "exp": int(NOW) + 600}  # fmt: skip
    if machine is not None:
        claims["machine"] = machine
    if fingerprint is not None:
        claims["fingerprint"] = fingerprint
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key())})


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


# --- the fingerprint ------------------------------------------------------------------------


def test_the_fingerprint_is_the_salted_sha256_of_the_os_machine_id_and_never_the_id(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")
    raw = os_machine_id("linux", linux_paths=[str(machine_id)])
    assert raw == "3D1219C7C4C5404AAA1F6D2A48ADFDA4"
    fingerprint = machine_fingerprint(APP, machine_id=raw)
    assert fingerprint == hashlib.sha256(b"com.example.draw3d1219c7c4c5404aaa1f6d2a48adfda4").hexdigest()
    assert len(fingerprint) == 64 and raw.lower() not in fingerprint
    # Another app on the same machine: another fingerprint (the two cannot be linked).
    assert machine_fingerprint("com.example.other", machine_id=raw) != fingerprint
    # The same machine id however it is read (case, a trailing newline): the same machine.
    assert machine_fingerprint(APP, machine_id=" 3d1219c7c4c5404aaa1f6d2a48adfda4\n") == fingerprint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads this Linux machine's /etc/machine-id")
def test_on_this_linux_machine_it_is_read_from_etc_machine_id() -> None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        if Path(path).exists() and Path(path).read_text().strip():
            expected = Path(path).read_text().strip().lower()
            break
    else:
        pytest.skip("this machine has no machine id")
    assert machine_fingerprint(APP) == hashlib.sha256((APP + expected).encode()).hexdigest()
    assert machine_fingerprint(APP) == machine_fingerprint(APP)  # stable: nothing random, nothing stored


def test_linux_falls_back_to_dbus_and_refuses_an_uninitialised_or_missing_id(tmp_path: Path) -> None:
    etc, dbus = tmp_path / "etc-machine-id", tmp_path / "dbus-machine-id"
    etc.write_text("uninitialized\n")  # what systemd writes before the first boot completes
    dbus.write_text("b08dfa6083e7567a1921a715000001fb\n")
    assert os_machine_id("linux", linux_paths=[str(etc), str(dbus)]) == "b08dfa6083e7567a1921a715000001fb"
    with pytest.raises(MachineIdUnavailable, match="holds a machine id"):
        os_machine_id("linux", linux_paths=[str(etc), str(tmp_path / "missing")])


def test_macos_reads_the_ioplatformuuid_from_ioreg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ioreg = tmp_path / "ioreg"
    ioreg.write_text(
        "#!/bin/sh\n"
        '[ "$*" = "-rd1 -c IOPlatformExpertDevice" ] || exit 2\n'
        "cat <<'OUT'\n"
        "+-o J314sAP  <class IOPlatformExpertDevice, id 0x100000223, registered, matched, active, busy 0>\n"
        '    "IOPlatformSerialNumber" = "C02XXXXXXXXX"\n'
        '    "IOPlatformUUID" = "6B29FC40-CA47-1067-B31D-00DD010662DA"\n'
        "OUT\n"
    )
    ioreg.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert os_machine_id("darwin") == "6B29FC40-CA47-1067-B31D-00DD010662DA"
    ioreg.write_text("#!/bin/sh\necho nothing\n")
    with pytest.raises(MachineIdUnavailable, match="IOPlatformUUID"):
        os_machine_id("darwin")


def test_windows_reads_machineguid_from_the_64_bit_registry_view(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[Any, ...]] = []

    class Key:
        def __enter__(self) -> Key:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def open_key(*args: Any) -> Key:
        opened.append(args)
        return Key()

    winreg = types.SimpleNamespace(
        HKEY_LOCAL_MACHINE="HKLM", KEY_READ=0x20019, KEY_WOW64_64KEY=0x0100, OpenKey=open_key,
        QueryValueEx=lambda key, name: ("c6f8e3a2-5b1d-4e7f-9a0c-2d3b4c5d6e7f", 1) if name == "MachineGuid" else None,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "winreg", winreg)
    assert os_machine_id("win32") == "c6f8e3a2-5b1d-4e7f-9a0c-2d3b4c5d6e7f"
    assert opened == [("HKLM", r"SOFTWARE\Microsoft\Cryptography", 0, 0x20019 | 0x0100)]


def test_no_machine_id_for_an_unknown_system_or_an_empty_salt() -> None:
    with pytest.raises(MachineIdUnavailable, match="pass machine_id="):
        os_machine_id("plan9")
    with pytest.raises(ValueError, match="app_id"):
        machine_fingerprint("", machine_id="abc")
    with pytest.raises(ValueError, match="app_id"):
        LicenseClient(OFFLINE, app_id="")


# --- the license key ------------------------------------------------------------------------


def test_a_key_is_read_as_the_broker_reads_it_and_a_typo_is_malformed_before_anything_is_sent() -> None:
    assert normalize_license_key(KEY) == KEY
    assert normalize_license_key(" py9w9 wm8f2\twt0qd\u2013eyjks-7ymed ") == KEY  # case, spaces, an en dash
    assert normalize_license_key("PY9W9-WM8F2-WTOQD-EYJKS-7YMED") == KEY  # O read as 0
    for typo in ("PY9W9-WM8F2-WT0QD-EYJKS-7YMEE", "PY9W9-WM8F2-WT0QD-EYJKS-7YME", "PY9W9-WM8F2-WT0QD-EYJKS-7YMEDU",
                 "YP9W9-WM8F2-WT0QD-EYJKS-7YMED", "", "x" * 101):  # fmt: skip
        with pytest.raises(MalformedLicenseKey):
            normalize_license_key(typo)


async def test_activate_checks_the_key_here_and_refuses_a_typo_without_a_request(tmp_path: Path) -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: requests.append(request) or httpx.Response(500))
    async with httpx.AsyncClient(transport=transport) as http:
        client = LicenseClient(OFFLINE, app_id=APP, machine_id="m1", cache=tmp_path / "lease", http=http)
        with pytest.raises(MalformedLicenseKey, match="typo"):
            await client.activate(KEY[:-1] + "E")
        with pytest.raises(MalformedLicenseKey):
            await client.machines(key="not a key")
        with pytest.raises(NotActivated):
            await client.machines()
        with pytest.raises(NotActivated):
            _ = client.license_id
    assert requests == [] and client.status == "stopped" and not client.activated and not client.is_entitled()


def test_a_client_follows_either_a_token_or_an_activation() -> None:
    with pytest.raises(TypeError, match="license_id and token"):
        LicenseClient(OFFLINE)
    with pytest.raises(TypeError, match="license_id and token"):
        LicenseClient(OFFLINE, LICENSE)
    with pytest.raises(TypeError, match="come from activate"):
        LicenseClient(OFFLINE, LICENSE, "t", app_id=APP)


async def test_a_token_client_has_no_keys_to_activate() -> None:
    client = LicenseClient(OFFLINE, LICENSE, "t")
    with pytest.raises(TypeError, match="app_id"):
        await client.activate(KEY)
    assert client.license_id == LICENSE and not client.activated and client.fingerprint is None


# --- leases bound to a machine ---------------------------------------------------------------


def test_a_lease_issued_to_a_machine_verifies_only_on_that_machine(key: Ed25519PrivateKey) -> None:
    verifier = LeaseVerifier([pem(key)], clock=lambda: NOW)
    here = MachineBinding("mch_a", machine_fingerprint(APP, machine_id="machine-a"))
    elsewhere = MachineBinding("mch_a", machine_fingerprint(APP, machine_id="machine-b"))
    lease = bound_lease(key, "mch_a", here.fingerprint)
    verified = verifier.verify(lease, LICENSE, machine=here)
    assert (verified.machine_id, verified.fingerprint, verified.entitled) == ("mch_a", here.fingerprint, True)
    with pytest.raises(InvalidLease, match="another computer"):
        verifier.verify(lease, LICENSE, machine=elsewhere)  # the same lease (and machine id), copied
    with pytest.raises(InvalidLease, match="another machine"):
        verifier.verify(lease, LICENSE, machine=MachineBinding("mch_b", here.fingerprint))
    with pytest.raises(InvalidLease, match="no machine activated"):
        verifier.verify(lease, LICENSE)  # a client following a token takes no machine's lease
    with pytest.raises(InvalidLease, match="another machine"):
        verifier.verify(bound_lease(key, None, None), LICENSE, machine=here)  # nor a machine an unbound one
    with pytest.raises(InvalidLease, match="another computer"):
        verifier.verify(bound_lease(key, "mch_a", None), LICENSE, machine=here)
    assert verifier.verify(bound_lease(key, None, None), LICENSE).machine_id is None  # 0.2's leases as before


def activated_app(key: Ed25519PrivateKey, directory: Path, os_id: str) -> LicenseClient:
    verifier = LeaseVerifier([pem(key)], clock=lambda: NOW)
    return LicenseClient(OFFLINE, app_id=APP, machine_id=os_id, verifier=verifier, cache=directory / "lease")


async def test_the_files_of_an_activated_app_copied_to_another_computer_unlock_nothing_there(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    fingerprint_a = machine_fingerprint(APP, machine_id="machine-a")
    MachineFile(here / "lease.machine").save(Credentials(LICENSE, "mch_a", "machine-token"))
    first = activated_app(key, here, "machine-a")
    assert await first.accept_lease(bound_lease(key, "mch_a", fingerprint_a)) is not None and first.is_entitled()
    # Restarted offline on the same machine: unlocked by its cached lease.
    assert activated_app(key, here, "machine-a").is_entitled()
    # Every file of the app (lease, watermark, activation) copied to another computer.
    there.mkdir()
    for name in ("lease", "lease.watermark", "lease.machine"):
        (there / name).write_bytes((here / name).read_bytes())
    copied = activated_app(key, there, "machine-b")
    assert copied.activated and copied.machine_id == "mch_a" and copied.fingerprint != fingerprint_a
    assert copied.lease is None and not copied.is_entitled()
    rejected: list[InvalidLease] = []
    copied.on_rejected = rejected.append
    assert await copied.accept_lease(bound_lease(key, "mch_a", fingerprint_a, seq=4)) is None
    assert not copied.is_entitled() and "another computer" in str(rejected[0])


def test_the_activation_file_is_the_users_only(tmp_path: Path) -> None:
    file = MachineFile(tmp_path / "app" / "lease.machine")
    file.save(Credentials(LICENSE, "mch_a", "secret-token"))
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    assert file.load() == Credentials(LICENSE, "mch_a", "secret-token")
    file.path.write_text("{not json")
    assert file.load() is None
    file.clear()
    file.clear()  # twice: nothing to remove
    assert file.load() is None


def test_a_machine_token_wants_renewal_once_half_of_its_life_is_spent() -> None:
    token = jwt.encode({"sub": LICENSE, "iat": 1000, "exp": 1000 + 3600}, "x" * 32, algorithm="HS256")
    credentials = Credentials(LICENSE, "mch_a", token)
    assert credentials.token_times() == (1000.0, 4600.0)
    assert Credentials(LICENSE, "mch_a", "not-a-jwt").token_times() is None


# --- the broker's refusals, one error each ----------------------------------------------------


def refusal(status: int, body: Any, **headers: str) -> BrokerError:
    return error_of(httpx.Response(status, json=body, headers=headers), body)


def test_each_refusal_of_the_broker_is_its_own_error() -> None:
    full = refusal(409, {"error": "machine limit reached", "max": 2, "machines": [
        {"id": "mch_1", "name": "laptop", "platform": "darwin", "created_at": "2026-01-01T00:00:00+00:00",
         "last_seen_at": "2026-01-02T00:00:00+00:00"}]})  # fmt: skip
    assert isinstance(full, MachineLimitReached) and full.max == 2 and full.status == 409
    assert [(m.id, m.name, m.last_seen_at) for m in full.machines] == [("mch_1", "laptop", "2026-01-02T00:00:00+00:00")]
    assert isinstance(refusal(400, {"error": "malformed key"}), MalformedLicenseKey)
    assert isinstance(refusal(403, {"error": "invalid key"}), InvalidLicenseKey)
    released = refusal(401, {"error": "machine released"})
    assert isinstance(released, MachineReleased) and isinstance(released, Unauthorized)
    assert released.code == "machine_released"
    assert type(refusal(401, {"error": "invalid token"})) is Unauthorized
    assert type(refusal(403, {"error": "token is for another license"})) is Unauthorized
    limited = refusal(429, {"error": "too many failed attempts, try again later"}, **{"retry-after": "37"})
    assert isinstance(limited, RateLimited) and limited.retry_after == 37.0
    assert isinstance(refusal(404, {"error": "no such machine"}), MachineNotFound)
    down = refusal(503, {"error": "database unavailable"}, **{"retry-after": "2"})
    assert isinstance(down, BrokerUnavailable) and down.retry_after == 2.0
    off = refusal(404, {"error": "license keys are off on this server (LICENSE_KEY_SECRET is not set)"})
    assert isinstance(off, NotOffered) and (off.feature, off.status, off.code) == ("keys", 404, "not_offered")
    assert isinstance(off, BrokerError) and "LICENSE_KEY_SECRET" in str(off)  # what 0.3 raised, still
    assert type(refusal(400, {"error": "fingerprint: 64 hex characters"})) is BrokerError


def test_each_refusal_of_buying_trying_and_managing_is_its_own_error() -> None:
    """docs/protocol.md's answers of POST /api/checkout, /api/trials and /api/portal."""
    for message, feature in [
        ("buying from the app is off on this server (STRIPE_PRICES is not set)", "checkout"),
        ("trials are off on this server (LICENSE_TRIAL_DAYS is not set)", "trials"),
        ("the billing portal is off on this server (STRIPE_API_KEY is not set)", "portal"),
    ]:
        off = refusal(404, {"error": message})
        assert isinstance(off, NotOffered) and (off.feature, off.status, off.code) == (feature, 404, "not_offered")
    unknown = refusal(400, {"error": "price: one of price_1Monthly, price_1Lifetime"})
    assert isinstance(unknown, UnknownPrice) and unknown.prices == ("price_1Monthly", "price_1Lifetime")
    paid = refusal(409, {"error": "this license is paid for already: manage it with POST /api/portal"})
    assert isinstance(paid, AlreadyPaid) and paid.status == 409
    assert isinstance(refusal(409, {"error": "this machine has had its trial"}), TrialUsed)
    nothing = "this license has no Stripe customer yet (nothing bought): nothing to manage"
    assert isinstance(refusal(409, {"error": nothing}), NoCustomer)
    throttled = refusal(429, {"error": "too many unpaid checkouts from your network, try again later"},
                        **{"retry-after": "600"})  # fmt: skip
    assert isinstance(throttled, RateLimited) and throttled.retry_after == 600.0
    refused = refusal(502, {"error": "Stripe refused: No such price: 'price_x'"})
    assert isinstance(refused, StripeRefused) and isinstance(refused, BrokerUnavailable)  # a 5xx still
    assert type(refusal(502, {"error": "Bad Gateway"})) is BrokerUnavailable  # a proxy's: try again
    unreachable = refusal(503, {"error": "Stripe is not reachable, try again later"}, **{"retry-after": "5"})
    assert isinstance(unreachable, BrokerUnavailable) and unreachable.retry_after == 5.0
    assert type(refusal(400, {"error": "fingerprint: not the machine of this token"})) is BrokerError
