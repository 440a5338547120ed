"""docs/openapi.yaml against the routes the apps serve: every route documented, with its methods,
and nothing documented that is not served."""

from __future__ import annotations

import yaml
from starlette.routing import Route

from broker.http import ops_routes
from stream.app import routes as stream_routes
from tests.support.processes import ROOT
from webhook.app import routes as webhook_routes


def served() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for route in [*webhook_routes, *stream_routes, *ops_routes()]:
        assert isinstance(route, Route)
        found.setdefault(route.path, set()).update(m.lower() for m in (route.methods or ()) if m != "HEAD")
    return found


def test_the_openapi_document_names_every_route_and_only_those() -> None:
    document = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    documented = {path: set(operations) - {"parameters"} for path, operations in document["paths"].items()}
    assert documented == served()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary") and operation.get("responses"), (method, path)
