"""Development mode's own Stripe Checkout and Billing Portal (`make run`, no Stripe account), so
that a new user sees the whole loop in a minute: the app's POST /api/checkout answers a
`checkout_url` of this broker (broker.licensing.gateway.LocalGateway); its Pay and Cancel buttons
sign the events Stripe would send and post them to this process's own webhook, as /dev/simulate
does, and Pay then goes on to the success page (/activate). POST /api/portal answers this broker's
portal page, whose buttons cancel the subscription at the period's end or at once the same way.

Mounted with the other development routes only (embedded.py, BROKER_DEV); they answer only
requests addressed to a loopback name, and the buttons' POSTs only JSON (see license_broker.dev)."""

from __future__ import annotations

import functools
import re
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from broker.runtime import Runtime
from broker.storage.schema import checkouts, stripe_objects
from broker.web.requestlog import REQUEST_ID
from license_broker.dev import _json_object, _own_url, _refused
from stream.activate import PAGE_HEADERS, STATIC
from stream.desktop import Desktop
from webhook.samples import SampleEvents
from webhook.signature import sign

_SESSION_ID = re.compile(r"cs_test_dev_[0-9a-f]{32}")
_LICENSE_ID = re.compile(r"lic_[A-Za-z0-9_]{1,100}")
# What development mode's prices cost on its pages (nothing is charged anywhere).
AMOUNTS = {"subscription": 1200, "payment": 4900}
FILES = {"dev-checkout.js": "text/javascript", "dev-portal.js": "text/javascript"}


class DevCheckoutEvents(SampleEvents):
    """The events Stripe sends for a Checkout Session of this broker's page, and for its portal."""

    def paid(self, session_id: str, mode: str) -> list[dict[str, Any]]:
        created = self.tick()
        if mode == "subscription":
            # As a first subscription's Checkout (SampleEvents "pay"), with this page's session.
            events = self.for_action("pay", created)
            events[-1]["data"]["object"]["id"] = session_id
            return events
        charge = self._charge(1, refunded=0) | {"amount": AMOUNTS["payment"], "amount_captured": AMOUNTS["payment"]}
        return [
            self.envelope("charge.succeeded", charge, created),
            self.envelope("checkout.session.completed", self._session(session_id, mode, "complete", created), created),
        ]

    def expired(self, session_id: str, mode: str) -> list[dict[str, Any]]:
        created = self.tick()
        return [self.envelope("checkout.session.expired", self._session(session_id, mode, "expired", created), created)]

    def canceled(self, *, at_period_end: bool) -> list[dict[str, Any]]:
        if not at_period_end:
            return self.for_action("cancel")
        created = self.tick()
        event = self.subscription_event("customer.subscription.updated", "active", created)
        sub = event["data"]["object"]
        sub.update(cancel_at_period_end=True, cancel_at=sub["items"]["data"][0]["current_period_end"])
        return [event]

    def _session(self, session_id: str, mode: str, status: str, created: int) -> dict[str, Any]:
        paid = status == "complete"
        return {
            "id": session_id,
            "object": "checkout.session",
            "amount_total": AMOUNTS["payment"],
            "client_reference_id": self.license_id,
            "created": created - 60,
            "currency": "usd",
            "customer": self.customer if paid else None,
            "livemode": False,
            "metadata": {"license_id": self.license_id},
            "mode": mode,
            "payment_intent": self.period(1)[1] if paid else None,
            "payment_status": "paid" if paid else "unpaid",
            "status": status,
            "subscription": None,
        }


def _loopback(request: Request) -> Response | None:
    # The other development routes' guard: a loopback Host, and no proxy in between.
    return _refused(request)


@functools.cache
def _page(name: str) -> str:
    return (STATIC / name).read_text()


def _html(name: str) -> Response:
    return Response(_page(name), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def dev_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in FILES:
        return JSONResponse({"error": "not found"}, 404)
    return FileResponse(
        STATIC / name, media_type=f"{FILES[name]}; charset=utf-8", headers={"cache-control": "no-cache"}
    )


async def _session(request: Request) -> dict[str, Any] | Response:
    """The page's checkout: license, price, mode and where it stands (open, paid, expired)."""
    if (refused := _loopback(request)) is not None:
        return refused
    session_id = request.path_params["session_id"]
    if not _SESSION_ID.fullmatch(session_id):
        return JSONResponse({"error": "not a development checkout"}, 404)
    runtime: Runtime = request.state.runtime
    c, o = checkouts, stripe_objects
    async with runtime.engine.connect() as conn:
        row = (await conn.execute(sa.select(c.c.license_id, c.c.price, c.c.mode).where(c.c.id == session_id))).first()
        recorded = await conn.scalar(sa.select(o.c.state).where(o.c.id == session_id))
    if row is None:
        return JSONResponse({"error": "no such checkout (paid, or canceled and removed)"}, 404)
    state = orjson.loads(recorded) if isinstance(recorded, str) else recorded
    status = {"paid": "paid", "expired": "expired"}.get(str((state or {}).get("status")), "open")
    desktop: Desktop = request.state.desktop
    return {
        "id": session_id,
        "license_id": row.license_id,
        "price": row.price,
        "mode": row.mode,
        "amount": AMOUNTS.get(row.mode, 0),
        "currency": "usd",
        "status": status,
        "app_name": desktop.settings.app_name,
        "success_url": f"/activate?session_id={session_id}",
    }


async def checkout_page(request: Request) -> Response:
    if (refused := _loopback(request)) is not None:
        return refused
    return _html("dev-checkout.html")


async def checkout_session(request: Request) -> Response:
    found = await _session(request)
    return found if isinstance(found, Response) else JSONResponse(found)


async def _deliver(request: Request, events: list[dict[str, Any]]) -> list[dict[str, Any]] | Response:
    """Sign the events with the webhook secret and post them to this process's webhook, as Stripe."""
    runtime: Runtime = request.state.runtime
    secret = runtime.settings.webhook_secrets[0]
    results = []
    async with httpx.AsyncClient(base_url=_own_url(request), timeout=10) as client:
        for event in events:
            payload = orjson.dumps(event)
            headers = {"stripe-signature": sign(payload, secret), "content-type": "application/json"}
            headers["x-request-id"] = REQUEST_ID.get() or ""
            response = await client.post("/api/stripe/webhooks", content=payload, headers=headers)
            results.append({"type": event["type"], "id": event["id"], "status": response.status_code})
            if response.status_code >= 300:
                return JSONResponse({"events": results, "error": response.text}, status_code=502)
    return results


async def checkout_action(request: Request) -> Response:
    """POST .../pay or .../cancel: what the buyer does on Stripe's page, as its webhooks."""
    if request.path_params["action"] not in ("pay", "cancel"):
        return JSONResponse({"error": "not found"}, 404)
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    found = await _session(request)
    if isinstance(found, Response):
        return found
    if found["status"] != "open":
        return JSONResponse({"error": f"this checkout is {found['status']} already"}, 409)
    events = DevCheckoutEvents(found["license_id"])
    pay = request.path_params["action"] == "pay"
    made = events.paid(found["id"], found["mode"]) if pay else events.expired(found["id"], found["mode"])
    delivered = await _deliver(request, made)
    if isinstance(delivered, Response):
        return delivered
    desktop: Desktop = request.state.desktop
    if not pay and desktop.pending is not None:
        desktop.pending.wake()  # the expired session's pending license goes now, not at the next pass
    return JSONResponse({"events": delivered, "success_url": found["success_url"] if pay else None})


async def portal_page(request: Request) -> Response:
    if (refused := _loopback(request)) is not None:
        return refused
    return _html("dev-portal.html")


async def _license(request: Request) -> tuple[str, dict[str, Any]] | Response:
    if (refused := _loopback(request)) is not None:
        return refused
    license_id = request.path_params["license_id"]
    if not _LICENSE_ID.fullmatch(license_id):
        return JSONResponse({"error": "not a license id"}, 404)
    runtime: Runtime = request.state.runtime
    current = orjson.loads((await runtime.event_log.current(license_id)).data)
    return license_id, current


async def portal_state(request: Request) -> Response:
    found = await _license(request)
    if isinstance(found, Response):
        return found
    license_id, current = found
    desktop: Desktop = request.state.desktop
    return_url = desktop.portal.return_url(_own_url(request)) if desktop.portal is not None else None
    state = current["state"]
    return JSONResponse(
        {
            "license_id": license_id,
            "status": current["status"],
            "entitled": current["entitled"],
            "kind": state["kind"],
            "subscription": state["subscription"],
            "current_period_end": state["current_period_end"],
            "cancel_at_period_end": state["cancel_at_period_end"],
            "return_url": return_url,
        }
    )


async def portal_cancel(request: Request) -> Response:
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    found = await _license(request)
    if isinstance(found, Response):
        return found
    license_id, current = found
    at_period_end = body.get("at_period_end")
    if not isinstance(at_period_end, bool):
        return JSONResponse({"error": "at_period_end: true or false"}, 400)
    if current["state"]["subscription"] is None or current["status"] == "canceled":
        return JSONResponse({"error": "no subscription to cancel"}, 409)
    delivered = await _deliver(request, DevCheckoutEvents(license_id).canceled(at_period_end=at_period_end))
    return delivered if isinstance(delivered, Response) else JSONResponse({"events": delivered})


routes = [
    Route("/dev/static/{name}", dev_file, methods=["GET"]),
    Route("/dev/checkout/{session_id}", checkout_page, methods=["GET"]),
    Route("/dev/checkout/{session_id}/session", checkout_session, methods=["GET"]),
    Route("/dev/checkout/{session_id}/{action:str}", checkout_action, methods=["POST"]),
    Route("/dev/portal/{license_id}", portal_page, methods=["GET"]),
    Route("/dev/portal/{license_id}/state", portal_state, methods=["GET"]),
    Route("/dev/portal/{license_id}/cancel", portal_cancel, methods=["POST"]),
]
