"""The one app builder: each part (the webhook, the stream, the live page) gives its routes and
the state it needs; `build_app` opens the runtime, enters every part's state in order, and adds
what every app serves (health, readiness, metrics, its OpenAPI document) and the request-id
middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.runtime import Runtime, open_runtime
from broker.settings import Settings
from broker.web import openapi
from broker.web.ops import ops_routes
from broker.web.requestlog import RequestIdMiddleware

StateFactory = Callable[[Runtime], AbstractAsyncContextManager[dict[str, Any]]]


@dataclass(frozen=True)
class Part:
    routes: Sequence[BaseRoute]
    state: StateFactory | None = None


class StreamRoute(Route):
    """A route whose response lasts as long as its connection (an SSE stream). Its requests skip
    starlette's middleware stack and router, with only the request id around them: every layer is
    a suspended coroutine, with its closures and a Request, for the whole life of the stream,
    ~3 KB of each idle connection (docs/bench.md). Its endpoint answers its own errors; an
    exception that escapes it is uvicorn's 500. Anything but a full match (another method: 405)
    goes the usual way."""


class _App(Starlette):
    def __init__(self, *, streams: Sequence[StreamRoute], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._streams: list[tuple[StreamRoute, ASGIApp]] = [(r, RequestIdMiddleware(r.app)) for r in streams]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route, app in self._streams:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope["app"] = self
                    scope["route"] = route
                    scope.update(child_scope)
                    await app(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


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
    return _App(
        streams=[route for route in routes if isinstance(route, StreamRoute)],
        routes=[*routes, *ops_routes(), openapi.ROUTE],
        lifespan=lifespan,
        middleware=[Middleware(RequestIdMiddleware)],
    )
