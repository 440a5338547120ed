"""Transports, chosen by name (BROKER_TRANSPORT); each module imported only when chosen."""

from __future__ import annotations

from broker.eventlog import EventLog
from broker.settings import Settings
from broker.transports.base import GapHandler, MessageHandler, Transport, channel

__all__ = ["GapHandler", "MessageHandler", "Transport", "channel", "create_transport"]


def create_transport(settings: Settings, events: EventLog) -> Transport:
    if settings.transport == "redis" and settings.redis_cluster:
        from broker.transports.redis_cluster import RedisClusterTransport

        assert settings.redis_url is not None
        return RedisClusterTransport(settings.redis_url)
    if settings.transport == "redis":
        from broker.transports.redis import RedisTransport

        assert settings.redis_url is not None
        return RedisTransport(settings.redis_url)
    if settings.transport == "poll":
        from broker.transports.poll import PollTransport

        return PollTransport(events, settings.poll_interval)
    from broker.transports.memory import MemoryTransport

    return MemoryTransport()
