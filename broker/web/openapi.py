"""`GET /openapi.json`: the HTTP API as OpenAPI 3.1, for clients written in other languages.

One source: `broker/web/openapi.yaml` describes every route of every app (the webhook, the stream,
`serve`'s page) and the events of the streams (in components). Each app serves the part it routes:
the paths it has, with the methods it answers, and the components those reach, so a client
generated from one process's document calls nothing that process lacks. The routes of development
mode (`/dev/...`) are not part of the API and are not described. tests/test_openapi.py keeps the
file and the routes in step (every route served is described, every route described is served by
some app) and checks the stream's real events against the components."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import orjson
import yaml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

SOURCE = Path(__file__).with_name("openapi.yaml")
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# Development mode's routes: tools of `make run`'s page, never served outside it.
UNDESCRIBED = re.compile(r"^/dev/")


@functools.cache
def document() -> dict[str, Any]:
    """The whole document, read once (a few milliseconds: off the event loop, see `openapi`)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loaded: dict[str, Any] = yaml.load(SOURCE.read_text(), Loader=loader)
    return loaded


def served(routes: Iterable[BaseRoute]) -> dict[str, set[str]]:
    """path -> the methods an app answers there (lower case; HEAD, which GET implies, left out)."""
    found: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, Route) and not UNDESCRIBED.match(route.path):
            found.setdefault(route.path, set()).update(m.lower() for m in route.methods or () if m != "HEAD")
    return found


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def document_for(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The document as an app with `routes` serves it: its paths and methods only, the components
    they reach, and no `servers` (so the API is where the document was fetched from)."""
    whole = document()
    methods = served(routes)
    paths = {
        path: {key: value for key, value in item.items() if key not in _METHODS or key in methods[path]}
        for path, item in whole["paths"].items()
        if path in methods
    }
    # The components reachable from those paths, following references between components too.
    components = whole.get("components", {})
    kept: dict[str, dict[str, Any]] = {"securitySchemes": dict(components.get("securitySchemes", {}))}
    pending = list(_refs(paths))
    while pending:
        ref = pending.pop()
        _, _, section, name = ref.split("/", 3)  # "#/components/<section>/<name>"
        if name in kept.setdefault(section, {}):
            continue
        kept[section][name] = components[section][name]
        pending += _refs(components[section][name])
    head = {key: value for key, value in whole.items() if key not in {"paths", "components", "servers"}}
    return {**head, "paths": paths, "components": {k: v for k, v in kept.items() if v}}


async def openapi(request: Request) -> Response:
    """This app's document; built once per app (the routes do not change while it runs)."""
    state = request.app.state
    body: bytes | None = getattr(state, "openapi_json", None)
    if body is None:
        routes = request.app.routes
        body = await anyio.to_thread.run_sync(lambda: orjson.dumps(document_for(routes)))
        state.openapi_json = body
    return Response(body, media_type="application/json", headers={"cache-control": "public, max-age=300"})


ROUTE = Route("/openapi.json", openapi, methods=["GET"])
