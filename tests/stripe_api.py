"""A local fake of the reads the broker makes from Stripe's API (STRIPE_API_KEY, STRIPE_API_BASE):
Checkout line items, a customer's active entitlements, an invoice's payments. It answers GET
requests from what the scenarios put in it, with Stripe's list pagination (`limit`,
`starting_after`, `has_more`), on a real socket in a thread of the test process; nothing leaves the
machine.

    api = FakeStripeApi()
    with api.serving() as base:          # STRIPE_API_BASE=base
        s = Scenario("current", api=api)  # its purchases and entitlements are readable here
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# The list endpoints the broker reads, and the query parameter each one is filtered by.
FILTERS = {"/v1/entitlements/active_entitlements": "customer", "/v1/invoice_payments": "invoice"}


class FakeStripeApi:
    def __init__(self) -> None:
        self.lists: dict[str, list[dict[str, Any]]] = {}  # "<path>" or "<path>?<filter>=<value>"
        self.requests: list[str] = []
        self.failing = False  # answer 500 to everything (an outage)
        self._lock = threading.Lock()

    def put_list(self, path: str, items: list[dict[str, Any]], **filters: str) -> None:
        key = path + "".join(f"?{k}={v}" for k, v in filters.items())
        with self._lock:
            self.lists[key] = list(items)

    def requested(self, path: str, **filters: str) -> int:
        """How many requests were made for `path` with these query parameters."""

        def matches(target: str) -> bool:
            url = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            return url.path == path and all(query.get(k) == v for k, v in filters.items())

        with self._lock:
            return sum(1 for r in self.requests if matches(r))

    def answer(self, target: str) -> tuple[int, dict[str, Any]]:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append(target)
            if self.failing:
                return 500, {"error": {"type": "api_error", "message": "fake outage"}}
            key = url.path
            if url.path in FILTERS:
                key += f"?{FILTERS[url.path]}={query.get(FILTERS[url.path], '')}"
            items = self.lists.get(key)
        if items is None:
            if url.path in FILTERS:
                items = []  # a list with nothing in it
            else:
                error = {"type": "invalid_request_error", "code": "resource_missing", "message": "No such object"}
                return 404, {"error": error}
        start = 0
        if "starting_after" in query:
            start = next((i + 1 for i, item in enumerate(items) if item.get("id") == query["starting_after"]), 0)
        limit = int(query.get("limit", "10"))
        page = items[start : start + limit]
        return 200, {"object": "list", "data": page, "has_more": start + limit < len(items), "url": url.path}

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = api.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", "req_fake")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, name="fake-stripe-api", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
