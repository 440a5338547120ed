"""The broker's routes of keys and machines (docs/protocol.md), one method each: the request, and
its answer parsed or its refusal raised as the error an app handles (license_broker_client.errors).
No state here: the client keeps the activation."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from license_broker_client.errors import BrokerError, BrokerUnavailable, error_of
from license_broker_client.machines import Activation, Credentials, Machine, MachineList

TIMEOUT = 15.0


def bearer(token: str) -> str:
    return f"Bearer {token}"


def license_auth(key: str) -> str:
    return f"License {key}"


class MachineRoutes:
    def __init__(self, base_url: str, http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http

    async def _call(self, method: str, path: str, *, auth: str | None = None, body: Any = None) -> dict[str, Any]:
        return (await self._answer(method, path, auth=auth, body=body))[1]

    async def _answer(
        self, method: str, path: str, *, auth: str | None = None, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"accept": "application/json"}
        if auth is not None:
            headers["authorization"] = auth
        http = self._http or httpx.AsyncClient(timeout=TIMEOUT)
        try:
            response = await http.request(method, self.base_url + path, headers=headers, json=body)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(f"the broker did not answer: {exc!r}") from None
        finally:
            if self._http is None:
                await http.aclose()
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 300:
            raise error_of(response, data)
        if not isinstance(data, dict):
            raise BrokerError(f"{response.status_code}: not a JSON object", status=response.status_code)
        return response.status_code, data

    async def activate(
        self, key: str, fingerprint: str, name: str | None, platform: str | None
    ) -> tuple[Activation, Credentials]:
        body = {"key": key, "fingerprint": fingerprint, "name": name, "platform": platform}
        status, data = await self._answer(
            "POST", "/api/activations", body={k: v for k, v in body.items() if v is not None}
        )
        try:
            machine = Machine.of(data["machine"]) if isinstance(data["machine"], dict) else None
            used = data["machines"]
            assert machine is not None and isinstance(used, dict)
            activation = Activation(
                license_id=str(data["license_id"]),
                machine=machine,
                created=status == 201,
                used=int(used["used"]),
                max=used["max"] if isinstance(used.get("max"), int) else None,
                lease=data.get("lease") if isinstance(data.get("lease"), str) else None,
            )
            credentials = Credentials(activation.license_id, machine.id, str(data["token"]))
        except (KeyError, TypeError, ValueError, AssertionError):
            raise BrokerError("the activation's answer is not what docs/protocol.md says") from None
        return activation, credentials

    async def machines(self, auth: str) -> MachineList:
        data = await self._call("GET", "/api/machines", auth=auth)
        try:
            listed = tuple(Machine.of(m) for m in data["machines"])
            limit = data["max"] if isinstance(data.get("max"), int) else None
            return MachineList(str(data["license_id"]), listed, int(data["used"]), limit)
        except (KeyError, TypeError, ValueError):
            raise BrokerError("the machine list is not what docs/protocol.md says") from None

    async def release(self, machine_id: str, auth: str) -> None:
        await self._call("DELETE", f"/api/machines/{quote(machine_id, safe='')}", auth=auth)

    async def renew(self, credentials: Credentials) -> tuple[Credentials, str | None]:
        """A fresh token for the machine (with its own token), and a lease bound to it."""
        path = f"/api/machines/{quote(credentials.machine_id, safe='')}/token"
        data = await self._call("POST", path, auth=bearer(credentials.token))
        token, lease = data.get("token"), data.get("lease")
        if not isinstance(token, str):
            raise BrokerError("the renewal's answer holds no token")
        renewed = Credentials(credentials.license_id, credentials.machine_id, token)
        return renewed, lease if isinstance(lease, str) else None

    async def checkout(
        self, fingerprint: str, name: str | None, platform: str | None, price: str | None, auth: str | None
    ) -> tuple[Credentials, str, float]:
        """POST /api/checkout: the machine's credentials, the checkout URL and its `expires_at`.
        With `auth` (this machine's token) the checkout is for its license and machine."""
        body = {"fingerprint": fingerprint, "name": name, "platform": platform, "price": price}
        if auth is not None:  # the token names the machine: its name and platform stay as they are
            body = {"fingerprint": fingerprint, "price": price}
        sent = {k: v for k, v in body.items() if v is not None}
        data = await self._call("POST", "/api/checkout", auth=auth, body=sent)
        try:
            credentials = Credentials(str(data["license_id"]), str(data["machine_id"]), str(data["token"]))
            url, expires_at = data["checkout_url"], float(data["expires_at"])
            assert isinstance(url, str) and url.startswith(("https://", "http://"))
        except (KeyError, TypeError, ValueError, AssertionError):
            raise BrokerError("the checkout's answer is not what docs/protocol.md says") from None
        return credentials, url, expires_at

    async def start_trial(
        self, fingerprint: str, name: str | None, platform: str | None
    ) -> tuple[Credentials, str | None, datetime]:
        """POST /api/trials: the trial machine's credentials, its lease and `trial_end`."""
        body = {"fingerprint": fingerprint, "name": name, "platform": platform}
        data = await self._call("POST", "/api/trials", body={k: v for k, v in body.items() if v is not None})
        try:
            credentials = Credentials(str(data["license_id"]), str(data["machine_id"]), str(data["token"]))
            trial_end = datetime.fromisoformat(str(data["trial_end"]))
            if trial_end.tzinfo is None:
                raise ValueError("trial_end: no time zone")
        except (KeyError, TypeError, ValueError):
            raise BrokerError("the trial's answer is not what docs/protocol.md says") from None
        lease = data.get("lease")
        return credentials, lease if isinstance(lease, str) else None, trial_end

    async def portal(self, auth: str) -> str:
        """POST /api/portal: the Billing Portal session's URL."""
        url = (await self._call("POST", "/api/portal", auth=auth)).get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise BrokerError("the portal's answer holds no URL")
        return url

    async def license_key(self, license_id: str, auth: str) -> str:
        data = await self._call("GET", f"/api/licenses/{quote(license_id, safe='')}/key", auth=auth)
        key = data.get("key")
        if not isinstance(key, str):
            raise BrokerError("the answer holds no key")
        return key
