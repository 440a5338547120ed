"""License keys: the typable format and its check, sealing under LICENSE_KEY_SECRET, the rows
(created once, rotated, resealed), and what a database dump gives away (nothing)."""

from __future__ import annotations

import asyncio
import base64
import random
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.licensing import keys
from broker.licensing.keys import KeyVault, MalformedKey, UnreadableKey
from broker.licensing.store import KeyStore
from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.schema import license_keys, machines, metadata
from tests.support.licenses import append, new_license
from tests.support.services import CI

SECRET = "k" * 32
OTHER = "o" * 32


def key_from(seed: int) -> str:
    """A deterministic key: 21 symbols of a seeded generator and their check symbols."""
    rng = random.Random(seed)
    body = [rng.randrange(32) for _ in range(keys.BODY)]
    return "".join(keys.ALPHABET[v] for v in keys._with_check(body))


def test_a_key_is_25_characters_of_the_alphabet_in_five_groups_and_carries_105_bits() -> None:
    key = keys.generate()
    assert len(key) == 25 and set(key) <= set(keys.ALPHABET)
    assert not set(key) & set("ILOU")
    shown = keys.display(key)
    assert [len(g) for g in shown.split("-")] == [5] * 5
    assert keys.BODY * 5 >= 100
    assert len({keys.generate() for _ in range(2000)}) == 2000


def test_a_key_reads_back_however_it_is_typed() -> None:
    key = key_from(1)
    shown = keys.display(key)
    typed = [
        shown,
        shown.lower(),
        key,
        " ".join(key[i : i + 5] for i in range(0, 25, 5)),
        f"  {shown.replace('-', ' - ')}\n",
        shown.replace("-", "\u2013"),  # an en dash, as word processors write it
        key.replace("0", "O").replace("1", "l"),  # Crockford: O is 0, I and L are 1
        key.replace("1", "I").lower(),
    ]
    for text in typed:
        assert keys.normalize(text) == key, text


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_every_single_typo_and_every_swap_of_neighbours_is_malformed(seed: int) -> None:
    key = key_from(seed)
    variants = {key[:i] + c + key[i + 1 :] for i in range(25) for c in keys.ALPHABET if c != key[i]}
    variants |= {key[:i] + key[i + 1] + key[i] + key[i + 2 :] for i in range(24) if key[i] != key[i + 1]}
    assert len(variants) > 775
    for variant in variants:
        with pytest.raises(MalformedKey):
            keys.normalize(variant)


def test_up_to_four_wrong_characters_are_always_caught() -> None:
    rng = random.Random(7)
    key = key_from(7)
    for _ in range(20_000):
        chars = list(key)
        for i in rng.sample(range(25), rng.randint(2, 4)):
            chars[i] = rng.choice([c for c in keys.ALPHABET if c != key[i]])
        with pytest.raises(MalformedKey):
            keys.normalize("".join(chars))


@pytest.mark.parametrize(
    "text",
    ["", "ABC", key_from(1)[:-1], key_from(1) + "0", key_from(1)[:-1] + "U", "x" * 101, key_from(1)[:-1] + "*"],
)
def test_what_is_not_a_key_is_malformed_without_a_lookup(text: str) -> None:
    with pytest.raises(MalformedKey):
        keys.normalize(text)


def test_a_sealed_key_opens_only_for_its_license_and_under_a_configured_secret() -> None:
    vault = KeyVault((SECRET,))
    key = keys.generate()
    sealed = vault.seal("lic_a", key)
    assert key.encode() not in sealed.sealed and sealed.digest in vault.digests(key)
    assert vault.open("lic_a", sealed.sealed, sealed.secret_id) == key
    with pytest.raises(UnreadableKey):
        vault.open("lic_b", sealed.sealed, sealed.secret_id)  # moved to another license's row
    with pytest.raises(UnreadableKey):
        KeyVault((OTHER,)).open("lic_a", sealed.sealed, sealed.secret_id)
    # A rotation: the new secret first seals, the old one still opens and finds.
    rotated = KeyVault((OTHER, SECRET))
    assert rotated.open("lic_a", sealed.sealed, sealed.secret_id) == key
    assert sealed.digest in rotated.digests(key)
    assert rotated.seal("lic_a", key).secret_id != sealed.secret_id


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=pg_url))
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_a_license_gets_one_key_when_first_asked_even_by_many_at_once(engine: AsyncEngine) -> None:
    store = KeyStore(engine, KeyVault((SECRET,)))
    license_id = new_license()
    assert await store.reveal(license_id) is None  # no such license: nothing created
    await append(engine, license_id)
    revealed = await asyncio.gather(*(store.reveal(license_id) for _ in range(8)))
    assert len(set(revealed)) == 1 and revealed[0] is not None
    assert await store.reveal(license_id) == revealed[0]
    assert await store.find(revealed[0]) == license_id
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(license_keys)) == 1


async def test_rotating_a_key_stops_the_old_one_at_once(engine: AsyncEngine) -> None:
    store = KeyStore(engine, KeyVault((SECRET,)))
    license_id = new_license()
    await append(engine, license_id)
    old = await store.reveal(license_id)
    assert old is not None
    new = await store.rotate(license_id)
    assert new is not None and new != old
    assert await store.find(old) is None
    assert await store.find(new) == license_id
    assert await store.reveal(license_id) == new
    assert await store.rotate(new_license()) is None


async def test_keys_sealed_under_an_old_secret_are_found_shown_and_sealed_again(engine: AsyncEngine) -> None:
    license_id, other = new_license(), new_license()
    for lid in (license_id, other):
        await append(engine, lid)
    before = KeyStore(engine, KeyVault((SECRET,)))
    key, other_key = await before.reveal(license_id), await before.reveal(other)
    assert key is not None and other_key is not None
    during = KeyStore(engine, KeyVault((OTHER, SECRET)))
    assert await during.find(key) == license_id
    assert await during.reveal(license_id) == key  # shown, and sealed again under OTHER
    assert await during.reseal_all() == 1  # the other license's row
    after = KeyStore(engine, KeyVault((OTHER,)))
    assert await after.reveal(license_id) == key and await after.reveal(other) == other_key
    assert await after.find(key) == license_id and await after.find(other_key) == other
    assert await KeyStore(engine, KeyVault((SECRET,))).find(key) is None
    with pytest.raises(UnreadableKey):
        await KeyStore(engine, KeyVault(("z" * 32,))).reveal(license_id)


async def test_the_migration_creates_the_tables_schema_py_declares(engine: AsyncEngine) -> None:
    def differences(conn: sa.Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
        return [d for d in diff if {"license_keys", "machines"} & set(map(str, _tables(d)))]

    async with engine.connect() as conn:
        assert await conn.run_sync(differences) == []


def _tables(diff: object) -> list[str]:
    found = []
    for item in diff if isinstance(diff, list) else [diff]:
        for part in item if isinstance(item, tuple) else (item,):
            name = getattr(part, "name", None) if not isinstance(part, str) else part
            table = getattr(part, "table", None)
            found += [str(name), str(getattr(table, "name", ""))]
    return found


def key_forms(key: str) -> list[bytes]:
    shown = keys.display(key)
    texts = {key, shown, key.lower(), shown.lower(), " ".join(shown.split("-")), key[:21]}
    forms = [t.encode() for t in texts]
    forms += [key.encode().hex().encode(), base64.b64encode(key.encode()), base64.b64encode(shown.encode())]
    return forms


async def test_a_database_dump_yields_no_key_and_no_fingerprint(pg_url: str, engine: AsyncEngine) -> None:
    """The dump an attacker would take (pg_dump of every table), searched for the key in every
    form a user or a program could write it, and for the fingerprint an activation sent."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        if CI:
            pytest.fail("pg_dump is not installed")
        pytest.skip("pg_dump is not installed")
    from broker.licensing.store import MachineStore

    store = KeyStore(engine, KeyVault((SECRET,)))
    license_id = new_license()
    await append(engine, license_id)
    key = await store.reveal(license_id)
    assert key is not None
    fingerprint = random.Random(3).randbytes(32).hex()
    async with engine.begin() as conn:
        await MachineStore.add(conn, license_id, keys.fingerprint_digest(fingerprint), "laptop", "linux")
    url = make_url(pg_url)
    argv = [pg_dump, "--data-only", "--inserts", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432),
            "-U", url.username or "postgres", url.database or ""]  # fmt: skip
    dump = (await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=60, check=True)).stdout
    assert b"INSERT INTO public.license_keys" in dump and b"INSERT INTO public.machines" in dump
    upper = dump.upper()
    for form in key_forms(key):
        assert form.upper() not in upper, form
    assert fingerprint.encode() not in dump.lower()
    # The sealed column is what a dump holds: it opens only with LICENSE_KEY_SECRET.
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(license_keys).where(license_keys.c.license_id == license_id))).one()
        fp = await conn.scalar(sa.select(machines.c.fingerprint).where(machines.c.license_id == license_id))
    assert key.encode() not in row.sealed and fp != bytes.fromhex(fingerprint)
