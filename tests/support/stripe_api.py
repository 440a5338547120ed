"""A local fake of the parts of Stripe's API the broker calls, built from Stripe's published example
objects (tests/fixtures/stripe-openapi/resources.json): reading objects (the refresh), the lists it
reads (a Checkout's line items, a customer's active entitlements, an invoice's payments, with
Stripe's pagination), Prices, Checkout Sessions (create, read, expire) and Billing Portal sessions.
STRIPE_API_BASE points the `stripe` package at it; nothing leaves the machine. `fake_api` serves it
in the test's event loop; `serving_in_thread(api.app())` for a module of broker processes.

It answers as Stripe does where the broker depends on it: form-encoded parameters, `expires_at`
within 30 minutes to 24 hours, `subscription_data` refused in payment mode, only open sessions
expire, an unknown price or customer is a 404 `resource_missing`. `payment_webhooks` gives the
events Stripe would send when the buyer pays a session it made."""

from __future__ import annotations

import copy
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.processes import serving

OPENAPI = Path(__file__).resolve().parents[1] / "fixtures" / "stripe-openapi"
EXAMPLES: dict[str, dict[str, Any]] = orjson.loads((OPENAPI / "resources.json").read_bytes())
API_VERSION = "2026-10-28.endive"
# The list endpoints the broker reads by a filter, and the query parameter of each; a list not put
# under its filter's value is empty. Other lists (a Checkout's line items) are 404 until put.
LIST_FILTERS = {"/v1/entitlements/active_entitlements": "customer", "/v1/invoice_payments": "invoice"}
_KEY = re.compile(r"([^\[\]]+)|\[([^\[\]]*)\]")


def decode_form(body: bytes) -> dict[str, Any]:
    """Stripe's form encoding (`metadata[license_id]=x`, `line_items[0][price]=p`) as nested objects."""
    root: dict[str, Any] = {}
    for name, value in parse_qsl(body.decode(), keep_blank_values=True):
        parts = [a or b for a, b in _KEY.findall(name)]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node and all(k.isdigit() for k in node):
        return [_lists(node[k]) for k in sorted(node, key=int)]
    return {k: _lists(v) for k, v in node.items()}


def _error(status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, **extra}}, status_code=status)


def price(price_id: str, *, recurring: bool = True, **metadata: str) -> dict[str, Any]:
    """Stripe's published price, recurring monthly or one-time."""
    found = copy.deepcopy(EXAMPLES["price"])
    found.update(id=price_id, metadata=metadata, livemode=False)
    if not recurring:
        found.update(type="one_time", recurring=None)
    return found


@dataclass
class FakeStripeApi:
    """GET /v1/<resource>/<id> answers the object stored under that path; Checkout and Billing
    Portal sessions are made by POST as Stripe makes them. Every request is noted."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    lists: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "<path>" or "<path>?<filter>=<value>"
    absent: set[str] = field(default_factory=set)  # list endpoints this API lacks (404), as an older one would
    requests: list[str] = field(default_factory=list)  # the path of each
    queries: list[dict[str, str]] = field(default_factory=list)  # and its query parameters
    accounts: list[str | None] = field(default_factory=list)  # the Stripe-Account header of each
    # (method, path, decoded form) of each POST, and the idempotency key it carried.
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    idempotency_keys: list[str | None] = field(default_factory=list)
    failing: bool = False  # every answer a 500 api_error: Stripe refusing
    base_url: str = ""

    def add_price(self, price_id: str, *, recurring: bool = True, **metadata: str) -> dict[str, Any]:
        found = self.objects[f"/v1/prices/{price_id}"] = price(price_id, recurring=recurring, **metadata)
        return found

    def session(self, session_id: str) -> dict[str, Any]:
        return self.objects[f"/v1/checkout/sessions/{session_id}"]

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return [o for p, o in self.objects.items() if p.startswith("/v1/checkout/sessions/")]

    def put_list(self, path: str, items: list[dict[str, Any]], **filters: str) -> None:
        """What a list endpoint answers (with `filters`: for that filter's value)."""
        self.lists[path + "".join(f"?{k}={v}" for k, v in filters.items())] = list(items)

    def requested(self, path: str, **filters: str) -> int:
        """How many requests were made for `path` with these query parameters."""
        return sum(
            1
            for p, q in zip(self.requests, self.queries, strict=True)
            if p == path and all(q.get(k) == v for k, v in filters.items())
        )

    def _note(self, request: Request) -> None:
        self.requests.append(request.url.path)
        self.queries.append(dict(request.query_params))
        self.accounts.append(request.headers.get("stripe-account"))

    async def retrieve(self, request: Request) -> JSONResponse:
        self._note(request)
        path = request.url.path
        if self.failing:
            return _error(500, "fake outage", "api_error")
        if path in self.absent:
            return _error(404, f"Unrecognized request URL (GET: {path})")
        if path in LIST_FILTERS or path in self.lists:
            return self._page(path, request)
        if path not in self.objects:
            return _error(404, "No such object", code="resource_missing")
        return JSONResponse(self.objects[path])

    def _page(self, path: str, request: Request) -> JSONResponse:
        """A page of a list, as Stripe pages them: `limit` (10), `starting_after`, `has_more`."""
        query = request.query_params
        key = f"{path}?{LIST_FILTERS[path]}={query.get(LIST_FILTERS[path], '')}" if path in LIST_FILTERS else path
        items = self.lists.get(key, [])
        start = 0
        if "starting_after" in query:
            start = next((i + 1 for i, item in enumerate(items) if item.get("id") == query["starting_after"]), 0)
        limit = int(query.get("limit", "10"))
        page = items[start : start + limit]
        return JSONResponse({"object": "list", "data": page, "has_more": start + limit < len(items), "url": path})

    async def _form(self, request: Request) -> dict[str, Any]:
        self._note(request)
        form = decode_form(await request.body())
        self.posts.append((request.url.path, form))
        self.idempotency_keys.append(request.headers.get("idempotency-key"))
        return form

    async def create_checkout(self, request: Request) -> JSONResponse:
        form = await self._form(request)
        if self.failing:
            return _error(500, "fake outage", "api_error")
        mode = form.get("mode")
        if mode not in ("payment", "subscription", "setup"):
            return _error(400, "Invalid mode", param="mode")
        if mode == "payment" and "subscription_data" in form:
            return _error(400, "You can not pass `subscription_data` in `payment` mode.", param="subscription_data")
        if mode == "subscription" and "payment_intent_data" in form:
            return _error(400, "You can not pass `payment_intent_data` in `subscription` mode.")
        items = form.get("line_items") or []
        for item in items:
            found = self.objects.get(f"/v1/prices/{item.get('price')}")
            if found is None:
                return _error(400, f"No such price: '{item.get('price')}'", code="resource_missing", param="price")
            if (found["type"] == "recurring") != (mode == "subscription"):
                return _error(400, "The price's type does not match the mode", param="line_items")
        now = int(time.time())
        expires_at = int(form.get("expires_at") or now + 86400)
        if not now + 1800 - 5 <= expires_at <= now + 86400 + 5:
            return _error(400, "expires_at must be between 30 minutes and 24 hours from now", param="expires_at")
        session_id = "cs_test_" + secrets.token_hex(24)
        session = copy.deepcopy(EXAMPLES["checkout.session"])
        session.update(
            id=session_id,
            mode=mode,
            status="open",
            payment_status="unpaid",
            created=now,
            expires_at=expires_at,
            livemode=False,
            metadata=form.get("metadata") or {},
            client_reference_id=form.get("client_reference_id"),
            customer=form.get("customer"),
            customer_creation=form.get("customer_creation"),
            success_url=form.get("success_url"),
            cancel_url=form.get("cancel_url"),
            payment_intent=None,
            subscription=None,
            invoice=None,
            url=f"{self.base_url}/pay/{session_id}",
        )
        # Kept for the test's assertions and for payment_webhooks (Stripe keeps them as well).
        session["_form"] = form
        self.objects[f"/v1/checkout/sessions/{session_id}"] = session
        return JSONResponse(_public(session))

    async def expire_checkout(self, request: Request) -> JSONResponse:
        await self._form(request)
        if self.failing:
            return _error(500, "fake outage", "api_error")
        session = self.objects.get(f"/v1/checkout/sessions/{request.path_params['session_id']}")
        if session is None:
            return _error(404, "No such checkout.session", code="resource_missing")
        if session["status"] != "open":
            return _error(400, f"Only Checkout Sessions with a status in [open] can be expired ({session['status']})")
        session["status"] = "expired"
        return JSONResponse(_public(session))

    async def create_portal(self, request: Request) -> JSONResponse:
        form = await self._form(request)
        if self.failing:
            return _error(500, "fake outage", "api_error")
        customer = form.get("customer")
        if not customer:
            return _error(400, "Missing required param: customer.", param="customer")
        portal = copy.deepcopy(EXAMPLES["billing_portal.session"])
        portal_id = "bps_" + secrets.token_hex(12)
        portal.update(
            id=portal_id,
            customer=customer,
            return_url=form.get("return_url"),
            livemode=False,
            created=int(time.time()),
            flow=None,
            url=f"{self.base_url}/portal/session/{portal_id}",
        )
        self.objects[f"/v1/billing_portal/sessions/{portal_id}"] = portal
        return JSONResponse(portal)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/checkout/sessions", self.create_checkout, methods=["POST"]),
                Route("/v1/checkout/sessions/{session_id}/expire", self.expire_checkout, methods=["POST"]),
                Route("/v1/billing_portal/sessions", self.create_portal, methods=["POST"]),
                Route("/v1/{path:path}", self.retrieve, methods=["GET"]),
            ]
        )

    def payment_webhooks(self, session_id: str, *, created: int | None = None) -> list[dict[str, Any]]:
        """What Stripe sends when the buyer pays the session (and marks it paid here): for a
        subscription, the subscription's creation, its first invoice paid and the completed
        session; for a one-time price, the charge and the completed session."""
        session = self.session(session_id)
        created = created or int(time.time())
        form = session["_form"]
        key = session_id[-16:]
        customer = session["customer"] or f"cus_{key}"
        session.update(status="complete", payment_status="paid", customer=customer)
        events = []
        if session["mode"] == "subscription":
            sub_id, invoice_id = f"sub_{key}", f"in_{key}"
            sub = copy.deepcopy(EXAMPLES["subscription"])
            sub.update(
                id=sub_id,
                customer=customer,
                status="active",
                metadata=(form.get("subscription_data") or {}).get("metadata") or {},
                cancel_at=None,
                cancel_at_period_end=False,
                canceled_at=None,
                ended_at=None,
                trial_end=None,
                latest_invoice=invoice_id,
                livemode=False,
            )
            for item in sub["items"]["data"]:
                item["current_period_end"] = created + 30 * 86400
                item["price"] = copy.deepcopy(self.objects[f"/v1/prices/{form['line_items'][0]['price']}"])
            invoice = copy.deepcopy(EXAMPLES["invoice"])
            invoice.update(id=invoice_id, customer=customer, status="paid", livemode=False, created=created)
            invoice["parent"] = {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {"subscription": sub_id, "metadata": sub["metadata"]},
            }
            session.update(subscription=sub_id, invoice=invoice_id)
            self.objects[f"/v1/subscriptions/{sub_id}"] = sub
            events += [envelope("customer.subscription.created", sub, created),
                       envelope("invoice.paid", invoice, created)]  # fmt: skip
        else:
            intent = f"pi_{key}"
            session.update(payment_intent=intent)
            charge = copy.deepcopy(EXAMPLES["charge"])
            charge.update(
                id=f"ch_{key}", customer=customer, payment_intent=intent, paid=True, captured=True,
                status="succeeded", refunded=False, amount_refunded=0, livemode=False,
                metadata=(form.get("payment_intent_data") or {}).get("metadata") or {},
            )  # fmt: skip
            events.append(envelope("charge.succeeded", charge, created))
        events.append(envelope("checkout.session.completed", _public(session), created))
        return events

    def expired_webhook(self, session_id: str) -> dict[str, Any]:
        """What Stripe sends once the session expired (by its expires_at, or by the expire call)."""
        session = self.session(session_id)
        session["status"] = "expired"
        return envelope("checkout.session.expired", _public(session), int(time.time()))


def _public(session: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}


def envelope(kind: str, obj: dict[str, Any], created: int, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:20]}",
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
        **fields,
    }


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeStripeApi, str]]:
    api = FakeStripeApi()
    async with serving(api.app()) as url:
        api.base_url = url
        yield api, url
