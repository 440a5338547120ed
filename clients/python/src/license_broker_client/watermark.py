"""The watermark: on disk, in a file of its own apart from the lease cache, the newest lease this
app has held (its seq and `iat`) and the latest time it has seen (epoch seconds).

It is what makes replaying an old lease and turning the clock back useless offline: a cached
lease older than the watermark is refused (a lease file copied back from before a refund), and
time never runs backwards for a lease (the clock read earlier than the latest time seen, beyond
the allowed skew, means it was turned back: no lease counts until it is right again). It cannot
stop someone who restores every file of the app from a backup; nothing on the machine alone can.

Written before the lease cache: a crash between the two leaves a cached lease below the
watermark, which is refused (locked until the next connection), never an old lease accepted."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from license_broker_client.cache import write_atomically


@dataclass(frozen=True, slots=True)
class Mark:
    license_id: str | None = None
    seq: int = -1
    issued_at: int = 0
    seen: float = 0.0


class Watermark:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def load(self) -> Mark | None:
        """None when there is no usable record (missing, unreadable, or not this format)."""
        try:
            data = json.loads(self.path.read_text(encoding="ascii"))
            mark = Mark(
                license_id=str(data["license_id"]),
                seq=int(data["seq"]),
                issued_at=int(data["issued_at"]),
                seen=float(data["seen"]),
            )
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            return None
        return mark

    def save(self, mark: Mark) -> None:
        write_atomically(self.path, json.dumps(asdict(mark)) + "\n")
