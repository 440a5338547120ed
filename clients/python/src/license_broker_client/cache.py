"""The last valid lease, on disk, so that an app started offline knows whether to unlock.

The file holds the lease as it was received (a compact JWS) and nothing else: it is verified
again when it is read, so editing it only ever makes it invalid."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class LeaseCache:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def load(self) -> str | None:
        try:
            token = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return token or None

    def save(self, token: str) -> None:
        """Atomically (a crash leaves the old lease or the new one, never half of one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(token + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
