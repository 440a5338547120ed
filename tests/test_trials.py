"""Trials without a card: one request gives an entitled license with the asking machine on it; the
trial ends on time (the stream pushes `entitled: false` at `trial_end`, written once whatever the
number of stream processes; offline the lease expires then); one trial per fingerprint, ever; the
requests of one address are bounded. Trial lengths of a few seconds come from LICENSE_TRIAL_DAYS
taking fractions of a day, which the settings allow on purpose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import orjson
import pytest
import sqlalchemy as sa

from broker.licensing.trials import trial_object
from broker.settings import Settings, SettingsError
from broker.signing.leases import private_pem
from broker.storage.db import create_engine
from broker.storage.schema import machines, subscription_event_logs, trials
from broker.stripe_ledger.ledger import LicenseRules, StripeObject, merge
from license_broker.embedded import create_app
from license_broker.rebuild import rebuild
from tests.support.activations import LEASE_KEYS, EventStream, bearer, fingerprint, keyed_env, keyed_settings
from tests.support.licenses import make_settings
from tests.support.processes import Process, process_env, serving
from tests.support.services import count_rows

RULES = LicenseRules(["trialing", "active", "past_due"])
# 4.32 s: long enough to see the trial running, short enough to wait for its end.
SHORT_TRIAL_DAYS = 0.00005


def claims_of(lease: str) -> dict[str, Any]:
    found: dict[str, Any] = jwt.decode(lease, LEASE_KEYS.signing.public_key(), algorithms=["EdDSA"])
    return found


async def start(client: httpx.AsyncClient, url: str, fp: str | None = None, **extra: Any) -> httpx.Response:
    return await client.post(f"{url}/api/trials", json={"fingerprint": fp or fingerprint(), **extra})


def test_a_running_trial_entitles_an_ended_one_is_expired_and_a_purchase_decides_over_it() -> None:
    running = trial_object("lic_t", "trialing", 1_800_000_000, 1_800_086_400)
    state = RULES.derive([running])
    assert (state["status"], state["entitled"], state["kind"]) == ("trialing", True, "trial")
    assert state["trial_end"] == datetime.fromtimestamp(1_800_086_400, UTC).isoformat()
    assert state["cancels_at"] == state["trial_end"]
    ended = trial_object("lic_t", "ended", 1_800_086_400, 1_800_086_400)
    assert (RULES.derive([ended])["status"], RULES.derive([ended])["entitled"]) == ("expired", False)

    # The ended snapshot wins whatever order the two arrive in (the ledger's merge).
    def fold(*snapshots: StripeObject) -> StripeObject | None:
        held = None
        for snapshot in snapshots:
            held = merge(held, snapshot)[0] or held
        return held

    assert fold(ended, running) == fold(running, ended) == ended
    # A one-time purchase made during the trial decides (its lease is not cut at the trial's end).
    paid = StripeObject("cs_paid", "checkout", 1_800_000_100, 2, {"mode": "payment", "status": "paid"})
    bought = RULES.derive([running, paid])
    assert (bought["status"], bought["kind"], bought["entitled"], bought["cancels_at"]) == (
        "paid",
        "perpetual",
        True,
        None,
    )


def test_license_trial_days_takes_fractions_is_off_unset_and_fourteen_in_development_mode() -> None:
    assert Settings.from_env({}).trial_days is None
    assert Settings.from_env({"LICENSE_KEY_SECRET": "k" * 32, "LICENSE_TRIAL_DAYS": "0.5"}).trial_days == 0.5
    assert Settings.from_env({"BROKER_DEV": "1"}).trial_days == 14
    for value, message in [
        ("0", "LICENSE_TRIAL_DAYS: must be more than 0"),
        ("-1", "LICENSE_TRIAL_DAYS: must be more than 0"),
        ("fortnight", "LICENSE_TRIAL_DAYS: expected a number of days"),
        ("1000", "LICENSE_TRIAL_DAYS: must be more than 0 and at most 730"),
    ]:
        with pytest.raises(SettingsError, match=f"^{message}"):
            Settings.from_env({"LICENSE_KEY_SECRET": "k" * 32, "LICENSE_TRIAL_DAYS": value})
    with pytest.raises(SettingsError, match=r"^LICENSE_TRIAL_DAYS: needs LICENSE_KEY_SECRET"):
        Settings.from_env({"LICENSE_TRIAL_DAYS": "14"})


async def test_a_trial_starts_entitled_with_a_machine_token_and_a_lease_that_ends_with_it(pg_url: str) -> None:
    settings = keyed_settings(pg_url, trial_days=14.0)
    fp = fingerprint()
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        before = time.time()
        response = await start(client, url, fp, name="Work laptop", platform="linux")
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == {"license_id", "machine_id", "token", "lease", "trial_end"}
        license_id = body["license_id"]
        trial_end = datetime.fromisoformat(body["trial_end"]).timestamp()
        assert before + 14 * 86400 - 1 <= trial_end <= time.time() + 14 * 86400
        claims = claims_of(body["lease"])
        assert (claims["sub"], claims["status"], claims["entitled"]) == (license_id, "trialing", True)
        assert (claims["machine"], claims["fingerprint"], claims["trial_end"]) == (body["machine_id"], fp, trial_end)
        assert claims["exp"] <= trial_end
        token = jwt.decode(body["token"], options={"verify_signature": False})
        assert (token["typ"], token["machine"], token["sub"]) == ("machine", body["machine_id"], license_id)
        state = (await client.get(f"{url}/api/licenses/{license_id}", headers=bearer(body["token"]))).json()
        assert (state["status"], state["entitled"], state["state"]["kind"]) == ("trialing", True, "trial")
        assert state["state"]["trial_end"] == body["trial_end"]
        listed = (await client.get(f"{url}/api/machines", headers=bearer(body["token"]))).json()
        assert [(m["name"], m["platform"], m["current"]) for m in listed["machines"]] == [
            ("Work laptop", "linux", True)
        ]


async def test_one_trial_per_fingerprint_ever_even_after_its_machine_is_released(pg_url: str) -> None:
    settings = keyed_settings(pg_url, trial_days=14.0)
    fp = fingerprint()
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        first = (await start(client, url, fp)).json()
        again = await start(client, url, fp.upper())
        assert (again.status_code, again.json()) == (409, {"error": "this machine has had its trial"})
        # A reinstall: the app lost its token and the machine was released; still the same machine.
        gone = await client.delete(f"{url}/api/machines/{first['machine_id']}", headers=bearer(first["token"]))
        assert gone.status_code == 200
        assert (await start(client, url, fp)).status_code == 409
        # Two at once for a new fingerprint: one trial.
        other = fingerprint()
        answers = await asyncio.gather(*(start(client, url, other) for _ in range(5)))
        assert sorted(a.status_code for a in answers) == [201, 409, 409, 409, 409]
        for bad, message in [({"fingerprint": "nope"}, "fingerprint: 64 hex"), ({}, "fingerprint: 64 hex")]:
            refused = await client.post(f"{url}/api/trials", json=bad)
            assert refused.status_code == 400 and refused.json()["error"].startswith(message)
    assert await count_rows(pg_url, "trials") == 2


async def test_with_trials_turned_off_none_starts_but_a_running_one_still_ends(pg_url: str) -> None:
    settings = keyed_settings(pg_url, trial_days=SHORT_TRIAL_DAYS)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        body = (await start(client, url)).json()
    trial_end = datetime.fromisoformat(body["trial_end"]).timestamp()
    # LICENSE_TRIAL_DAYS unset since: no new trial, and the clock still ends the running one.
    async with serving(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient(timeout=10) as client:
        response = await start(client, url)
        assert (response.status_code, response.json()) == (
            404,
            {"error": "trials are off on this server (LICENSE_TRIAL_DAYS is not set)"},
        )
        events_url = f"{url}/api/licenses/{body['license_id']}/events"
        async with EventStream(client, events_url, bearer(body["token"])) as stream:
            while (state := orjson.loads(await stream.until("message", within=trial_end - time.time() + 5)))[
                "entitled"
            ]:
                pass
        assert (state["status"], state["stripe_event_type"]) == ("expired", "trial.ended")
    assert await count_rows(pg_url, "licenses") == 1


async def test_a_thousand_trial_requests_from_one_address_start_ten_and_grow_nothing_else(pg_url: str) -> None:
    settings = keyed_settings(pg_url, trial_days=14.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=30) as client:
        codes: list[int] = []
        for _ in range(10):
            codes += [r.status_code for r in await asyncio.gather(*(start(client, url) for _ in range(100)))]
    assert codes.count(201) == 10 and codes.count(429) == 990
    for table in ("trials", "licenses", "machines"):
        assert await count_rows(pg_url, table) == 10, table
    assert await count_rows(pg_url, "subscription_event_logs") == 10


async def log_rows(url: str, license_id: str) -> list[tuple[int, str | None, bool]]:
    engine = create_engine(make_settings(url))
    t = subscription_event_logs
    try:
        async with engine.connect() as conn:
            query = sa.select(t.c.seq, t.c.stripe_event_type, t.c.entitled).where(t.c.license_id == license_id)
            return [tuple(r) for r in (await conn.execute(query.order_by(t.c.seq))).all()]  # type: ignore[misc]
    finally:
        await engine.dispose()


async def test_the_trial_end_is_pushed_on_time_and_written_once_by_two_stream_processes(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    """Two stream processes with Redis, both with the trial on their clock; one machine follows the
    license on each. At trial_end both streams get `entitled: false` (the same seq) within a second,
    the log holds one `trial.ended` row, and a reconnect replays that same event."""
    # 13 s: time for the second process to start before the trial ends.
    env = process_env(
        pg_url,
        REDIS_URL=redis_url,
        LICENSE_TRIAL_DAYS="0.00015",
        LICENSE_SIGNING_KEY=private_pem(LEASE_KEYS.signing),
        **keyed_env(),
    )
    first = spawn("stream", env)
    # The trial lasts ~13 s, with no byte between its opening and its end (heartbeats every 15 s).
    async with httpx.AsyncClient(timeout=30) as client:
        body = (await start(client, first.url)).json()
        license_id, token = body["license_id"], body["token"]
        trial_end = datetime.fromisoformat(body["trial_end"]).timestamp()
        # Started after the trial: its clock learns of it from the database at start-up.
        second = spawn("stream", env)
        streams = [
            EventStream(client, f"{p.url}/api/licenses/{license_id}/events", bearer(token)) for p in (first, second)
        ]
        arrivals: list[tuple[float, dict[str, Any]]] = []
        for stream in streams:
            await stream.__aenter__()
        try:
            for stream in streams:
                opening = orjson.loads(await stream.until("message"))
                assert (opening["seq"], opening["entitled"], opening["status"]) == (1, True, "trialing")

            async def arrival(stream: EventStream) -> None:
                ended = orjson.loads(await stream.until("message", within=trial_end - time.time() + 5))
                arrivals.append((time.time(), ended))
                lease = claims_of(orjson.loads(await stream.until("lease"))["lease"])
                assert lease["entitled"] is False and "trial_end" not in lease

            await asyncio.gather(*map(arrival, streams))
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)
        replayed = EventStream(
            client, f"{second.url}/api/licenses/{license_id}/events", bearer(token) | {"last-event-id": "1"}
        )
        async with replayed:
            assert orjson.loads(await replayed.until("message"))["seq"] == 2
    for arrived, event in arrivals:
        assert (event["seq"], event["entitled"], event["status"], event["stripe_event_type"]) == (
            2,
            False,
            "expired",
            "trial.ended",
        )
        assert trial_end <= arrived < trial_end + 1.0, f"pushed {arrived - trial_end:+.3f} s after trial_end"
    assert await log_rows(pg_url, license_id) == [(1, "trial.started", True), (2, "trial.ended", False)]
    written = datetime.fromisoformat(arrivals[0][1]["recorded_at"]).timestamp() - trial_end
    pushed = max(a for a, _ in arrivals) - trial_end
    print(f"\ntrial end written {written:+.3f} s, pushed to both streams {pushed:+.3f} s after trial_end")


async def test_the_lease_of_a_trial_expires_at_its_end_and_a_rebuild_keeps_the_trial(pg_url: str) -> None:
    settings = keyed_settings(pg_url, trial_days=SHORT_TRIAL_DAYS * 4)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        body = (await start(client, url)).json()
        claims = claims_of(body["lease"])
        trial_end = datetime.fromisoformat(body["trial_end"]).timestamp()
        # Offline, this lease is all the app has: it stops verifying when the trial ends.
        assert claims["exp"] == trial_end < time.time() + settings.lease_ttl
        changed = await rebuild(settings)
        assert body["license_id"] not in {lid for lid, _ in changed}
        state = (await client.get(f"{url}/api/licenses/{body['license_id']}", headers=bearer(body["token"]))).json()
        assert (state["status"], state["entitled"]) == ("trialing", True)
        engine = create_engine(settings)
        try:
            async with engine.connect() as conn:
                machine = (await conn.execute(sa.select(machines.c.fingerprint))).scalar_one()
                trial = (await conn.execute(sa.select(trials.c.fingerprint))).scalar_one()
        finally:
            await engine.dispose()
        assert machine == trial and len(trial) == 32  # a hash, not the fingerprint sent


async def test_migration_0007_creates_the_checkout_and_trial_tables_schema_py_declares(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from broker.storage.db import migrate
    from broker.storage.schema import metadata

    engine = create_engine(make_settings(db_url))

    def differences(conn: sa.Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return [d for d in compare_metadata(context, metadata) if {"checkouts", "trials"} & set(_names(d))]

    try:
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
    finally:
        await engine.dispose()


def _names(diff: object) -> list[str]:
    found = []
    for item in diff if isinstance(diff, list) else [diff]:
        for part in item if isinstance(item, tuple) else (item,):
            name = getattr(part, "name", None) if not isinstance(part, str) else part
            found += [str(name), str(getattr(getattr(part, "table", None), "name", ""))]
    return found
