"""METRICS_PORT: /metrics on a port of its own, off the public one, for as long as the app runs.

Served in the app's own event loop, with the protocol of the public ports
(broker.web.server: a request head bounded in bytes and in time), rather than by
prometheus-client's threaded server, which gives each connection a thread of its own for as long
as the client keeps it open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from prometheus_client import make_asgi_app
from uvicorn.server import ServerState

from broker.settings import Settings, SettingsError
from broker.web.server import BoundedHeadProtocol


@contextlib.asynccontextmanager
async def metrics_server(settings: Settings) -> AsyncIterator[None]:
    if settings.metrics_port is None:
        yield
        return
    # Not uvicorn.Server: it would take the process's signals from the app's own server, and
    # configure logging again. Only the protocol and the ASGI app are uvicorn's here.
    config = uvicorn.Config(make_asgi_app(), lifespan="off", log_config=None, proxy_headers=False)
    config.load()
    state = ServerState()

    def protocol() -> BoundedHeadProtocol:
        connection = BoundedHeadProtocol(config, state, {})
        connection.access_log = False  # a scrape every few seconds is not worth a log line
        return connection

    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(protocol, host=settings.metrics_host, port=settings.metrics_port)
    except OSError as exc:
        # Typically a second process (a `--workers` sibling) on the same port.
        address = f"{settings.metrics_host}:{settings.metrics_port}"
        raise SettingsError(f"METRICS_PORT: cannot listen on {address}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        server.close()
        for connection in list[Any](state.connections):
            connection.shutdown()
        await server.wait_closed()
