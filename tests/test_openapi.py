"""broker/web/openapi.yaml, the one description of the HTTP API, against what the apps do: it is valid
OpenAPI 3.1; each app serves at /openapi.json the part it routes, and routes nothing it does not
describe; every route described is served by some app; and the answers and stream events of a
real session (a purchase, an activation, a machine's stream with its lease and token renewal,
notices, errors) match the schemas the document gives for them, status code by status code."""

from __future__ import annotations

import asyncio
import base64
import time
import tomllib
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.applications import Starlette

from broker.signing import tokens
from broker.web import openapi
from license_broker.embedded import create_app as serve_app
from stream.app import create_app as stream_app
from tests.support.activations import EventStream, activate, bearer, fingerprint, key_of, keyed_settings
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import ROOT, serving
from webhook.app import create_app as webhook_app
from webhook.samples import SampleEvents

DOCUMENT = openapi.document()
URI = "urn:license-broker:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
)


def schema_errors(instance: object, ref: str) -> list[str]:
    """Why `instance` does not match the schema at `ref` ("#/components/..."), formats checked."""
    validator = Draft202012Validator(
        {"$ref": URI + ref}, registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    # The version of the API is the server package's.
    assert DOCUMENT["info"]["version"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    validate(DOCUMENT)
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary") and operation.get("responses"), (method, path)


# -- each app serves its part ----------------------------------------------------------------


def apps(sqlite_url: str) -> Iterator[tuple[str, Starlette]]:
    settings = make_settings(sqlite_url)
    yield "webhook", webhook_app(settings)
    yield "stream", stream_app(settings)
    yield "serve", serve_app(settings)
    yield "serve (development mode)", serve_app(make_settings(sqlite_url, dev=True))


async def served_document(app: Starlette) -> dict[str, Any]:
    """GET /openapi.json of an app, in this process (its lifespan is not needed for it)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


async def test_each_app_serves_the_description_of_exactly_the_routes_it_serves(sqlite_url: str) -> None:
    described: set[str] = set()
    for name, app in apps(sqlite_url):
        document = await served_document(app)
        validate(document)  # the references it keeps resolve: it stands on its own
        routes = openapi.served(app.routes)
        assert {path: set(item) - {"parameters"} for path, item in document["paths"].items()} == routes, name
        assert "servers" not in document  # the API is where the document came from
        described |= set(document["paths"])
        if name == "webhook":
            ops = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
            assert set(document["paths"]) == {"/api/stripe/webhooks", *ops}
            assert "LicenseStreamEvent" not in document["components"]["schemas"]  # only what its routes reach
        else:
            assert "LicenseStreamEvent" in document["components"]["schemas"]
        undescribed = [r.path for r in app.routes if getattr(r, "path", "").startswith("/dev/")]
        assert bool(undescribed) == (name == "serve (development mode)"), name
    assert described == set(DOCUMENT["paths"]), "described but served by no app"


def test_a_route_missing_from_the_document_is_not_hidden() -> None:
    """openapi.served() reads what an app routes, so a route the YAML lacks is a difference the
    test above sees (it does not filter the routes by the document)."""
    from starlette.routing import Route

    async def endpoint(request: object) -> None: ...

    extra = Route("/api/undocumented", endpoint, methods=["GET", "POST"])
    assert openapi.served([extra]) == {"/api/undocumented": {"get", "post"}}
    assert openapi.document_for([extra])["paths"] == {}


# -- real answers and events against their schemas ---------------------------------------------


def check(response: httpx.Response, template: str) -> Any:
    """The answer's body, after checking it against the document: its status is one the operation
    names, the headers that status names are there, and a JSON body matches its schema."""
    method = response.request.method.lower()
    status = str(response.status_code)
    answers = DOCUMENT["paths"][template][method]["responses"]
    assert status in answers, f"{method.upper()} {template} answered {status}, which the document does not name"
    escaped = template.replace("~", "~0").replace("/", "~1")
    where, answer = f"/paths/{escaped}/{method}/responses/{status}", answers[status]
    if "$ref" in answer:  # a shared answer of components/responses
        where = answer["$ref"][1:]
        answer = DOCUMENT["components"]["responses"][where.rsplit("/", 1)[1]]
    for header in answer.get("headers", {}):
        assert header.lower() in response.headers, f"{method.upper()} {template} {status}: no {header}"
    if "application/json" not in answer.get("content", {}):
        return None
    body = response.json()
    assert schema_errors(body, f"#{where}/content/application~1json/schema") == [], (method, template, status, body)
    return body


def event_schemas(name: str) -> dict[str, dict[str, Any]]:
    """The stream event schema `name`'s branches: event name -> the branch (its `data` schema)."""
    branches = DOCUMENT["components"]["schemas"][name]["oneOf"]
    return {b["properties"].get("event", {}).get("const", "message"): b for b in branches}


def check_event(schema: str, event: str, data: str, event_id: str | None = None) -> Any:
    """An SSE event as a parser hands it over, against the document's schema for that stream: its
    envelope, then its data (JSON Schema does not validate `contentSchema`: here it is)."""
    envelope: dict[str, Any] = {"data": data} | ({"event": event} if event != "message" else {})
    if event_id is not None:
        envelope["id"] = event_id
    assert schema_errors(envelope, f"#/components/schemas/{schema}") == [], envelope
    branch = event_schemas(schema)[event]["properties"]["data"]
    if "contentSchema" not in branch:
        return None
    parsed = orjson.loads(data)
    assert schema_errors(parsed, branch["contentSchema"]["$ref"]) == [], (event, parsed)
    return parsed


class RawStream(EventStream):
    """EventStream that also hands over the `id:` of each event."""

    async def next_with_id(self, within: float = 10.0) -> tuple[str, str, str | None]:
        name, data, event_id = "message", [], None
        async with asyncio.timeout(within):
            while True:
                line = await anext(self._lines)
                if line == "":
                    if data:
                        return name, "\n".join(data), event_id
                    continue
                field, _, value = line.partition(": ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
                elif field == "id":
                    event_id = value


def jws_part(token: str, index: int) -> Any:
    part = token.split(".")[index]
    return orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


@pytest.mark.slow
async def test_the_answers_and_events_of_a_session_match_the_document(pg_url: str) -> None:
    settings = keyed_settings(pg_url, machine_token_ttl=60.0, trial_days=14.0)
    license_id, trial = new_license(), new_license()
    async with serving(serve_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        events = f"{url}/api/licenses/{license_id}/events"
        # Before anything: seq 0, status none, on the state route and as the stream's first event.
        state = check(await client.get(f"{url}/api/licenses/{license_id}", headers=bearer(token_for(license_id))),
                      "/api/licenses/{license_id}")  # fmt: skip
        assert (state["seq"], state["state"]["status"], state["state"]["notice"]) == (0, "none", None)
        assert jws_part(state["lease"], 0) == {"alg": "EdDSA", "kid": jws_part(state["lease"], 0)["kid"], "typ": "JWT"}
        assert schema_errors(jws_part(state["lease"], 1), "#/components/schemas/LeaseClaims") == []

        sample = SampleEvents(license_id)
        for event in sample.for_action("pay"):
            check(await post_event(client, url, event), "/api/stripe/webhooks")
        session_id = SampleEvents(license_id).checkout_completed(0)["data"]["object"]["id"]
        found = check(await client.get(f"{url}/api/checkout-sessions/{session_id}/license"),
                      "/api/checkout-sessions/{session_id}/license")  # fmt: skip
        key = await key_of(client, url, session_id)
        assert found["key"] == key and found["entitled"] is True
        async with RawStream(client, f"{url}/api/checkout-sessions/{session_id}/events") as stream:
            name, data, _ = await stream.next_with_id()
            assert check_event("CheckoutSessionStreamEvent", name, data)["key"] == key
        async with RawStream(client, f"{url}/api/checkout-sessions/cs_test_notyet/events") as stream:
            assert (await stream.next_with_id())[0] == "waiting"
            check_event("CheckoutSessionStreamEvent", "waiting", "{}")

        fp = fingerprint()
        activated = check(await activate(client, url, key, fp=fp, name="laptop", platform="linux"), "/api/activations")
        machine_id = activated["machine"]["id"]
        assert schema_errors(jws_part(activated["lease"], 1), "#/components/schemas/LeaseClaims") == []
        # A machine token past half its life: the stream renews it right after the state and lease.
        old, _ = tokens.mint_machine(settings, license_id, machine_id, fp, now=time.time() - 40)
        async with RawStream(client, events, bearer(old)) as stream:
            seen = [await stream.next_with_id() for _ in range(3)]
            assert [name for name, _, _ in seen] == ["message", "lease", "token"]
            state_event = check_event("LicenseStreamEvent", *seen[0][:2], seen[0][2])
            assert seen[0][2] == str(state_event["seq"]) and state_event["entitled"] is True
            lease = check_event("LicenseStreamEvent", *seen[1][:2])
            claims = jws_part(lease["lease"], 1)
            assert schema_errors(claims, "#/components/schemas/LeaseClaims") == []
            assert (claims["machine"], claims["fingerprint"], claims["seq"]) == (machine_id, fp, state_event["seq"])
            renewed = check_event("LicenseStreamEvent", *seen[2][:2])
            assert renewed["machine_id"] == machine_id
            # A payment that needs the customer: a notice on the next state.
            action = sample.invoice_event("invoice.payment_action_required", sample.tick(), 2)
            action["data"]["object"]["hosted_invoice_url"] = "https://invoice.stripe.com/i/x"
            check(await post_event(client, url, action), "/api/stripe/webhooks")
            name, data, event_id = await stream.next_with_id()
            noticed = check_event("LicenseStreamEvent", name, data, event_id)
            assert noticed["state"]["notice"]["type"] == "payment_action_required"
        machine = bearer(renewed["token"])
        check(await client.get(f"{url}/api/machines", headers=machine), "/api/machines")
        key_answer = await client.get(f"{url}/api/licenses/{license_id}/key", headers=machine)
        check(key_answer, "/api/licenses/{license_id}/key")
        check(await client.post(f"{url}/api/machines/{machine_id}/token", headers=machine),
              "/api/machines/{machine_id}/token")  # fmt: skip
        check(await client.delete(f"{url}/api/machines/{machine_id}", headers=machine), "/api/machines/{machine_id}")

        # A trial without a card: its answer, its state (kind "trial") and its lease (trial_end).
        started = check(await client.post(f"{url}/api/trials", json={"fingerprint": fingerprint()}), "/api/trials")
        async with RawStream(
            client, f"{url}/api/licenses/{started['license_id']}/events", bearer(started["token"])
        ) as s:
            name, data, event_id = await s.next_with_id()
            assert check_event("LicenseStreamEvent", name, data, event_id)["state"]["kind"] == "trial"
            lease = check_event("LicenseStreamEvent", *(await s.next_with_id())[:2])
            claims = jws_part(lease["lease"], 1)
            assert (
                schema_errors(claims, "#/components/schemas/LeaseClaims") == [] and claims["exp"] <= claims["trial_end"]
            )

        # A trial about to end: the other notice.
        trial_sample = SampleEvents(trial)
        kind = "customer.subscription.trial_will_end"
        ending = trial_sample.subscription_event(kind, "trialing", trial_sample.tick())
        ending["data"]["object"]["trial_end"] = trial_sample.tick() + 3 * 86400
        check(await post_event(client, url, ending), "/api/stripe/webhooks")
        state = check(await client.get(f"{url}/api/licenses/{trial}", headers=bearer(token_for(trial))),
                      "/api/licenses/{license_id}")  # fmt: skip
        assert state["state"]["notice"]["type"] == "trial_will_end"

        # Refusals: each status with its documented body and headers.
        refusals = [
            (await client.get(events), "/api/licenses/{license_id}/events"),
            (await client.get(events, headers=bearer(token_for(trial))), "/api/licenses/{license_id}/events"),
            (await client.get(events, headers=bearer(token_for(license_id)) | {"last-event-id": "x"}),
             "/api/licenses/{license_id}/events"),
            (await client.get(events, headers=machine), "/api/licenses/{license_id}/events"),  # released
            (await client.post(f"{url}/api/activations", json={"key": "nope", "fingerprint": fp}), "/api/activations"),
            (await client.post(f"{url}/api/activations", content=b"{}"), "/api/activations"),
            (await client.get(f"{url}/api/checkout-sessions/nope/license"),
             "/api/checkout-sessions/{session_id}/license"),
            (await client.post(f"{url}/api/stripe/webhooks", content=b"{}"), "/api/stripe/webhooks"),
        ]  # fmt: skip
        # Failed activations from one address: past ten in a minute, every activation is refused.
        for _ in range(10):
            throttled = await client.post(f"{url}/api/activations", json={"key": "nope", "fingerprint": fp})
        refusals.append((throttled, "/api/activations"))
        assert [r.status_code for r, _ in refusals] == [401, 403, 400, 401, 400, 415, 400, 400, 429]
        for response, template in refusals:
            check(response, template)
        assert refusals[3][0].json() == {"error": "machine released"}
