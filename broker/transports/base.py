"""The transport interface: how a committed event travels from the webhook to the streams. What
travels is an event's wire bytes, or a notice, and a message is read back by broker.wire.decode."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from broker.wire import LicenseEvent

# Called with each event the transport delivers; never concurrently, must not block.
MessageHandler = Callable[[LicenseEvent], None]
# Called after the transport may have lost messages (a reconnect): SweptTransport sweeps then.
GapHandler = Callable[[], None]


def channel(license_id: str) -> str:
    return f"license:{license_id}"


def ignore_gap() -> None:
    """The gap handler of a caller that needs none (the transport below it is reliable)."""


class Transport(ABC):
    """Carries event payloads (the JSON of one LicenseEvent) between processes.

    Contract:
    - `publish` is called after the commit. A lossy transport (`reliable = False`: Redis pub/sub
      loses what is published while its subscriber is disconnected) is never used alone:
      `create_transport` puts it inside a SweptTransport, whose database sweep finds what it
      loses. A reliable transport delivers every committed event to its handler, possibly twice
      or out of order (the stream skips seqs already sent and fetches gaps: stream.catchup).
    - After `listen(license_id)` returns, events committed for that license reach the handler
      given to `start`. `listen`/`unlisten` are reference-free: the hub counts its clients and
      calls each once per license.
    - `start` and `close` own the transport's connections and tasks; `close` is safe to call twice.
    - Publish-only users (the webhook) never call `start`.
    """

    name: str = "?"
    # True when nothing committed can fail to reach the handler (no database sweep needed on top).
    reliable: bool = False

    async def connect(self) -> None:
        """Open what publishing needs."""

    async def start(self, on_message: MessageHandler, on_gap: GapHandler = ignore_gap) -> None:
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
