"""`license-broker key` and `license-broker machines`: the seller's view of keys and machines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import orjson

from broker.licensing import keys
from broker.settings import Settings, SettingsError

# The database and transport stack is imported where a command uses it, not when the parser is
# built (license_broker.cli: `--help` and a refused setting answer at once).
if TYPE_CHECKING:
    from broker.licensing.machines import Machines


@asynccontextmanager
async def _machines(settings: Settings) -> AsyncIterator[Machines]:
    """The use cases with what a one-shot command needs: the database, and the transport that
    carries a release's notice to the stream processes (without Redis, they find it at their next
    sweep, within BROKER_POLL_INTERVAL)."""
    from broker.licensing.machines import Machines
    from broker.licensing.store import KeyStore
    from broker.storage.db import create_engine, migrate
    from broker.storage.eventlog import EventLog
    from broker.transports import create_transport

    if settings.license_keys is None:
        raise SettingsError("LICENSE_KEY_SECRET: required by key and machines (the one the stream processes have)")
    engine = create_engine(settings)
    try:
        if settings.is_sqlite:
            await migrate(engine)
        events = EventLog(engine)
        transport = create_transport(settings, events)
        await transport.connect()
        try:
            store = KeyStore(engine, settings.license_keys)
            yield Machines(engine, settings, store, transport, events, None)
        finally:
            await transport.close()
    finally:
        await engine.dispose()


async def key(args: argparse.Namespace, settings: Settings) -> int:
    async with _machines(settings) as uses:
        if args.reseal:
            count = await uses.keys.reseal_all()
            print(f"sealed {count} key(s) again under the first LICENSE_KEY_SECRET", file=sys.stderr)
            return 0
        if args.license_id is None:
            print("license-broker: key: LICENSE_ID is required (or --reseal)", file=sys.stderr)
            return 2
        found = await (uses.keys.rotate if args.rotate else uses.keys.reveal)(args.license_id)
        if found is None:
            print(f"license-broker: key: no license {args.license_id!r}", file=sys.stderr)
            return 1
        print(keys.display(found))
        if args.rotate:
            print("the old key no longer activates (machines already activated keep working)", file=sys.stderr)
    return 0


async def list_or_release(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from broker.storage.schema import machines

    words = args.words
    async with _machines(settings) as uses:
        if len(words) == 2 and words[0] == "release":
            machine_id = words[1]
            async with uses.engine.connect() as conn:
                license_id = await conn.scalar(sa.select(machines.c.license_id).where(machines.c.id == machine_id))
            if license_id is None or not await uses.release(str(license_id), machine_id):
                print(f"license-broker: machines: no machine {machine_id!r}", file=sys.stderr)
                return 1
            print(f"released {machine_id} of license {license_id}")
            return 0
        if len(words) != 1:
            print("license-broker: machines: expected LICENSE_ID, or release MACHINE_ID", file=sys.stderr)
            return 2
        found, limit = await uses.list(words[0])
    if args.json:
        listed = [m.public() for m in found]
        print(orjson.dumps({"license_id": words[0], "machines": listed, "used": len(found), "max": limit}).decode())
        return 0
    for m in found:
        print(f"{m.id}  {m.name or '-'}  {m.platform or '-'}  last seen {m.last_seen_at.isoformat(timespec='seconds')}")
    print(f"{len(found)} of {limit if limit is not None else 'unlimited'} machine(s)", file=sys.stderr)
    return 0


Use = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
Command = Callable[[argparse.Namespace, Settings], int]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], run: Callable[[Use], Command]) -> None:
    """The parsers; `run(coroutine function)` makes a command of a use case."""
    p = sub.add_parser("key", help="print a license's key (created if it has none), or --rotate it")
    p.add_argument("license_id", nargs="?")
    p.add_argument("--rotate", action="store_true", help="replace the key: the old one stops activating at once")
    p.add_argument(
        "--reseal", action="store_true", help="seal every key under the first LICENSE_KEY_SECRET (after a rotation)"
    )
    p.set_defaults(run=run(key))
    p = sub.add_parser(
        "machines",
        help="list a license's machines (machines LICENSE_ID), or release one (machines release MACHINE_ID)",
    )
    p.add_argument("words", nargs="+", metavar="LICENSE_ID | release MACHINE_ID")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(run=run(list_or_release))
