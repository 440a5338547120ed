"""`license-broker serve`: both apps in one process, sharing one runtime (and, with the memory
transport, one in-process channel), plus the live page at `/` and, in development mode only,
the endpoints behind its buttons."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from broker.http import ops_routes
from broker.requestlog import RequestIdMiddleware
from broker.runtime import Runtime, open_runtime
from broker.settings import Settings
from stream.app import routes as stream_routes
from stream.app import stream_state
from stream.page import routes as page_routes
from webhook.app import routes as webhook_routes
from webhook.app import webhook_state


def create_app(settings: Settings, on_ready: Callable[[Runtime], None] | None = None) -> Starlette:
    settings.require_webhook()
    settings.require_stream()
    # The command line also checks the host it binds to; whoever builds this app checks at least this.
    settings.require_development_ok("serve")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with (
            open_runtime(settings) as runtime,
            webhook_state(runtime) as webhook,
            stream_state(runtime) as stream,
        ):
            if on_ready is not None:
                on_ready(runtime)
            yield {"runtime": runtime, **webhook, **stream}

    routes: list[BaseRoute] = [*webhook_routes, *stream_routes, *ops_routes(), *page_routes]
    if settings.dev:
        # They mint tokens for anyone who asks: never mounted outside development mode.
        from license_broker.dev import routes as dev_routes

        routes += dev_routes
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(RequestIdMiddleware)])
