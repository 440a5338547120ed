"""Transports, chosen by name (BROKER_TRANSPORT); each backend imported only when chosen."""

from __future__ import annotations

import dataclasses

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.transports.base import GapHandler, MessageHandler, Transport, channel
from broker.transports.sweep import DatabaseSweep
from broker.transports.swept import SweptTransport

__all__ = ["GapHandler", "MessageHandler", "Transport", "channel", "create_transport"]


def create_transport(settings: Settings, events: EventLog) -> Transport:
    """The transport the settings name; a lossy one with the database sweep underneath, and its
    live messages checked against the database on a connection of their own (no I/O until a
    stream process starts it)."""
    transport = _named(settings, events)
    if transport.reliable:
        return transport
    check_engine = create_engine(dataclasses.replace(settings, db_pool_size=1))
    return SweptTransport(transport, DatabaseSweep(events, settings.poll_interval), check_engine)


def _named(settings: Settings, events: EventLog) -> Transport:
    if settings.transport == "redis":
        assert settings.redis_url is not None
        if settings.redis_cluster:
            from broker.transports.redis_cluster import RedisClusterTransport

            return RedisClusterTransport(settings.redis_url)
        from broker.transports.redis import RedisTransport

        return RedisTransport(settings.redis_url)
    if settings.transport == "poll":
        from broker.transports.poll import PollTransport

        return PollTransport(DatabaseSweep(events, settings.poll_interval))
    from broker.transports.memory import MemoryTransport

    return MemoryTransport()
