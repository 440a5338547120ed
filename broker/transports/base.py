"""The transport interface: how a committed event travels from the webhook to the streams."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

# Called with (license_id, payload) for each message; never concurrently, must not block.
MessageHandler = Callable[[str, bytes], None]
# Called after the transport may have lost messages (a reconnect): the hub sweeps the database.
GapHandler = Callable[[], None]


def channel(license_id: str) -> str:
    return f"license:{license_id}"


class Transport(ABC):
    """Carries event payloads (the JSON of one LicenseEvent) between processes.

    Contract:
    - `publish` is called after the commit. Delivery is at most once: a transport may lose a
      message (Redis pub/sub does, during an outage), so the stream never relies on it alone:
      it fetches gaps and sweeps the database (stream.hub).
    - After `listen(license_id)` returns, messages published for that license reach the handler
      given to `start` (unless lost as above). `listen`/`unlisten` are reference-free: the hub
      counts its clients and calls each once per license.
    - `start` and `close` own the transport's connections and tasks; `close` is safe to call twice.
    - Publish-only users (the webhook) never call `start`.
    """

    name: str = "?"
    # True when the transport itself never loses a message (no database sweep needed on top).
    reliable: bool = False

    async def connect(self) -> None:
        """Open what publishing needs."""

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        """Begin receiving (stream processes)."""

    @abstractmethod
    async def publish(self, license_id: str, payload: bytes) -> None: ...

    @abstractmethod
    async def listen(self, license_id: str) -> None: ...

    @abstractmethod
    async def unlisten(self, license_id: str) -> None: ...

    async def close(self) -> None:
        """Release connections and tasks; idempotent."""

    async def check(self) -> bool:
        """Whether the transport can deliver now (for /readyz)."""
        return True
