"""`license-broker serve`: both apps in one process, sharing one runtime (and, with the memory
transport, one in-process channel), plus the live page at `/` and, in development mode only,
the endpoints behind its buttons."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette

from broker.runtime import Runtime
from broker.settings import Settings
from broker.web.asgi import Part, build_app
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

    parts = [Part(webhook_routes, webhook_state), Part(stream_routes, stream_state), Part(page_routes)]
    if settings.dev:
        # They mint tokens for anyone who asks: never mounted outside development mode.
        from license_broker.dev import routes as dev_routes
        from license_broker.dev_pages import routes as dev_page_routes

        parts.append(Part([*dev_routes, *dev_page_routes]))
    return build_app(settings, parts, on_ready)
