"""Which lease counts now: the newest one verified (received, or read back from the cache at
start-up), checked against the watermark and against a clock that is not allowed to run back.
No network and no asyncio here, so that an activation (or any other source of leases) can hand
its lease to the same holder."""

from __future__ import annotations

import logging
from dataclasses import replace

from license_broker_client.cache import LeaseCache
from license_broker_client.leases import InvalidLease, Lease, LeaseExpired, LeaseVerifier, MachineBinding
from license_broker_client.watermark import Mark, Watermark

log = logging.getLogger("license_broker_client")

# The watermark's time is written at most this often while nothing else changes (seconds): the
# most a clock turned back between two writes can gain, on top of the allowed skew.
SEEN_WRITE_INTERVAL = 600.0


class LeaseHolder:
    def __init__(
        self,
        license_id: str,
        verifier: LeaseVerifier,
        cache: LeaseCache | None,
        watermark: Watermark | None,
        machine: MachineBinding | None = None,
    ) -> None:
        self.license_id = license_id
        self.verifier = verifier
        # This machine, when the license was activated here with a key: only leases issued to it
        # count (a lease copied from another computer names that computer).
        self.machine = machine
        self.cache = cache
        self.watermark = watermark
        self._lease: Lease | None = None
        self._mark = Mark(license_id)
        self._seen_written = 0.0
        self._restored = False

    @property
    def lease(self) -> Lease | None:
        """The newest valid lease: received, or else the cached one (read on first use)."""
        self.restore()
        return self._lease

    @property
    def mark(self) -> Mark:
        return self._mark

    def clock_behind(self) -> bool:
        """The clock reads earlier than the latest time seen, beyond the skew: it was turned back."""
        return self.verifier.clock() < self._mark.seen - self.verifier.max_skew

    def now(self) -> float:
        """The clock, never earlier than the latest time seen."""
        return max(self.verifier.clock(), self._mark.seen)

    def is_entitled(self) -> bool:
        lease = self.lease
        self._observe(self.verifier.clock())
        if lease is None or not lease.entitled or self.clock_behind():
            return False
        # The clock turned back below the lease's own issue time, within what the watermark allows.
        if lease.issued_at > self.verifier.clock() + self.verifier.max_skew:
            return False
        return lease.valid_at(self.now())

    def restore(self) -> Lease | None:
        """Reads the watermark and the cached lease, once; the cached lease counts only if it is
        not older than the watermark and the clock has not been turned back."""
        if self._restored:
            return self._lease
        self._restored = True
        on_disk = self.watermark.load() if self.watermark is not None else None
        if on_disk is not None:
            self._seen_written = on_disk.seen
            # Another license's record still says what time it is; its seq does not apply here.
            same = on_disk.license_id == self.license_id
            self._mark = on_disk if same else Mark(self.license_id, seen=on_disk.seen)
        token = self.cache.load() if self.cache is not None else None
        expired = False
        if token is not None:
            try:
                cached = self._check_cached(token, on_disk)
            except InvalidLease as exc:
                expired = isinstance(exc, LeaseExpired)
                log.log(logging.INFO if expired else logging.WARNING, "cached lease ignored: %s", exc)
            else:
                if cached.supersedes(self._lease, self.now()):
                    self._lease = cached
        self.tick(write=expired)
        return self._lease

    def _check_cached(self, token: str, on_disk: Mark | None) -> Lease:
        if self.watermark is not None and (on_disk is None or on_disk.license_id != self.license_id):
            raise InvalidLease(f"no record of the leases this app has held ({self.watermark.path} is missing)")
        if self.clock_behind():
            raise InvalidLease("the clock is behind the latest time this app has seen: it was turned back")
        lease = self.verifier.verify(token, self.license_id, now=self.now(), machine=self.machine)
        if lease.seq < self._mark.seq or lease.issued_at < self._mark.issued_at:
            raise InvalidLease(
                f"older than a lease this app has held (seq {lease.seq} < {self._mark.seq}, or issued earlier)"
            )
        return lease

    def accept(self, token: str) -> Lease | None:
        """Verify a lease from the broker and hold it (and write it down) if it supersedes the one
        held. None if it does not; InvalidLease if it does not verify or is older than the
        watermark. The broker's newer lease wins by `iat` even with a lower seq: its database
        was restored from a backup, and its current state is the truth."""
        self.restore()
        lease = self.verifier.verify(token, self.license_id, machine=self.machine)
        mark = self._mark
        if lease.seq <= mark.seq and lease.issued_at < mark.issued_at:
            if lease.seq == mark.seq:
                return None  # the same state, signed a moment earlier (another broker process's clock)
            # An older state's lease, signed before one this app already held: a replay.
            raise InvalidLease(f"older than a lease this app has held (seq {lease.seq}, seq {mark.seq} held)")
        if not lease.supersedes(self._lease, self.now()):
            return None
        # The broker's signed iat proves the time; it also resets a watermark left too far ahead
        # by a clock that was once set wrong the other way.
        new_mark = Mark(self.license_id, lease.seq, lease.issued_at, max(self.verifier.clock(), lease.issued_at))
        self._write(new_mark, token)
        self._mark = new_mark
        self._lease = lease
        return lease

    def forget(self) -> None:
        """Drop the lease held and the cached one (this machine was released): the watermark stays,
        so that no older lease comes back."""
        self.restore()
        self._lease = None
        if self.cache is not None:
            try:
                self.cache.clear()
            except OSError as exc:
                log.warning("cached lease not removed: %s", exc)

    def _write(self, mark: Mark, token: str) -> None:
        # The watermark first: see watermark.py. A full disk must not stop the stream.
        try:
            if self.watermark is not None:
                self.watermark.save(mark)
                self._seen_written = mark.seen
            if self.cache is not None:
                self.cache.save(token)
        except OSError as exc:
            log.warning("lease not written to disk: %s", exc)

    def _observe(self, clock: float) -> None:
        if clock > self._mark.seen:
            self._mark = replace(self._mark, seen=clock)

    def tick(self, *, write: bool = False) -> None:
        """Note the clock's time in the watermark: written every SEEN_WRITE_INTERVAL, and as soon
        as a lease is seen expired (turning the clock back then revives nothing)."""
        self._observe(self.verifier.clock())
        seen, written = self._mark.seen, self._seen_written
        write = write or seen - written >= SEEN_WRITE_INTERVAL
        write = write or (self._lease is not None and written < self._lease.expires_at <= seen)
        if self.watermark is None or not write:
            return
        try:
            self.watermark.save(self._mark)
            self._seen_written = seen
        except OSError as exc:
            log.warning("watermark not written: %s", exc)

    def seconds_left(self) -> float | None:
        """Until the held lease expires, by the clock that never runs back; None without one."""
        lease = self.lease
        return None if lease is None else lease.expires_at - self.now()
