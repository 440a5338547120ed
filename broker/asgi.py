"""The one app builder: each part (the webhook, the stream, the live page) gives its routes and
the state it needs; `build_app` opens the runtime, enters every part's state in order, and adds
what every app serves (health, readiness, metrics) and the request-id middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from broker.http import ops_routes
from broker.requestlog import RequestIdMiddleware
from broker.runtime import Runtime, open_runtime
from broker.settings import Settings

StateFactory = Callable[[Runtime], AbstractAsyncContextManager[dict[str, Any]]]


@dataclass(frozen=True)
class Part:
    routes: Sequence[BaseRoute]
    state: StateFactory | None = None


def build_app(
    settings: Settings, parts: Sequence[Part], on_ready: Callable[[Runtime], None] | None = None
) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_runtime(settings) as runtime, AsyncExitStack() as stack:
            state: dict[str, Any] = {"runtime": runtime}
            for part in parts:
                if part.state is not None:
                    state |= await stack.enter_async_context(part.state(runtime))
            if on_ready is not None:
                on_ready(runtime)
            yield state

    routes = [route for part in parts for route in part.routes]
    return Starlette(routes=[*routes, *ops_routes()], lifespan=lifespan, middleware=[Middleware(RequestIdMiddleware)])
