import type { LeaseCache } from "./cache.js";
import { InvalidLeaseError, type Lease, LeaseExpiredError, type LeaseVerifier, leaseValidAt, type MachineBinding, supersedes } from "./leases.js";
import type { Mark, Watermark } from "./watermark.js";

/** The watermark's time is written at most this often while nothing else changes (seconds). */
export const SEEN_WRITE_INTERVAL_S = 600;

/**
 * Which lease counts now: the newest one verified (received, or read back from the cache at
 * start-up), checked against the watermark and against a clock that is not allowed to run back.
 * No network here, so that an activation (or any other source of leases) can hand its lease to
 * the same holder. Its methods that write are called one at a time (the client chains them).
 */
export class LeaseHolder {
  private current: Lease | null = null;
  private marked: Mark;
  private seenWritten = 0;
  private restoring: Promise<Lease | null> | undefined;

  constructor(
    readonly licenseId: string,
    readonly verifier: LeaseVerifier,
    readonly cache: LeaseCache | undefined,
    readonly watermark: Watermark | undefined,
    private readonly log: (message: string) => void = () => {},
    /**
     * This machine, when the license was activated here with a key: only leases issued to it count
     * (a lease copied from another computer names that computer).
     */
    readonly machine: MachineBinding | null = null,
  ) {
    this.marked = { licenseId, seq: -1, issuedAt: 0, seen: 0 };
  }

  get lease(): Lease | null {
    return this.current;
  }

  get mark(): Mark {
    return this.marked;
  }

  private clockSeconds(): number {
    return this.verifier.clock() / 1000;
  }

  /** The clock reads earlier than the latest time seen, beyond the skew: it was turned back. */
  clockBehind(): boolean {
    return this.clockSeconds() < this.marked.seen - this.verifier.maxSkewMs / 1000;
  }

  /** The clock (ms), never earlier than the latest time seen. */
  nowMs(): number {
    return Math.max(this.verifier.clock(), this.marked.seen * 1000);
  }

  isEntitled(): boolean {
    const lease = this.current;
    this.observe();
    if (lease === null || !lease.entitled || this.clockBehind()) return false;
    // The clock turned back below the lease's own issue time, within what the watermark allows.
    if (lease.issuedAt * 1000 > this.verifier.clock() + this.verifier.maxSkewMs) return false;
    return leaseValidAt(lease, this.nowMs());
  }

  /** Milliseconds until the held lease expires, by the clock that never runs back; null without one. */
  msLeft(): number | null {
    return this.current === null ? null : this.current.expiresAt * 1000 - this.nowMs();
  }

  /**
   * Reads the watermark and the cached lease, once; the cached lease counts only if it is not
   * older than the watermark and the clock has not been turned back.
   */
  restore(): Promise<Lease | null> {
    this.restoring ??= this.restoreOnce();
    return this.restoring;
  }

  private async restoreOnce(): Promise<Lease | null> {
    const onDisk = this.watermark ? await this.watermark.load() : null;
    if (onDisk !== null) {
      this.seenWritten = onDisk.seen;
      // Another license's record still says what time it is; its seq does not apply here.
      this.marked = onDisk.licenseId === this.licenseId ? onDisk : { licenseId: this.licenseId, seq: -1, issuedAt: 0, seen: onDisk.seen };
    }
    const token = this.cache ? await this.cache.load() : null;
    let expired = false;
    if (token !== null) {
      try {
        const cached = await this.checkCached(token, onDisk);
        if (supersedes(cached, this.current, this.nowMs())) this.current = cached;
      } catch (error) {
        if (!(error instanceof InvalidLeaseError)) throw error;
        expired = error instanceof LeaseExpiredError;
        if (!expired) this.log(`cached lease ignored: ${error.message}`); // an expired one is routine
      }
    }
    await this.tick(expired);
    return this.current;
  }

  private async checkCached(token: string, onDisk: Mark | null): Promise<Lease> {
    if (this.watermark !== undefined && (onDisk === null || onDisk.licenseId !== this.licenseId)) {
      throw new InvalidLeaseError(`no record of the leases this app has held (${this.watermark.path} is missing)`);
    }
    if (this.clockBehind()) throw new InvalidLeaseError("the clock is behind the latest time this app has seen: it was turned back");
    const lease = await this.verifier.verify(token, this.licenseId, { nowMs: this.nowMs(), machine: this.machine });
    if (lease.seq < this.marked.seq || lease.issuedAt < this.marked.issuedAt) {
      throw new InvalidLeaseError(`older than a lease this app has held (seq ${lease.seq} < ${this.marked.seq}, or issued earlier)`);
    }
    return lease;
  }

  /**
   * Verify a lease from the broker and hold it (and write it down) if it supersedes the one held.
   * null if it does not; InvalidLeaseError if it does not verify or is older than the watermark.
   * The broker's newer lease wins by `iat` even with a lower seq: its database was restored from a
   * backup, and its current state is the truth.
   */
  async accept(token: string): Promise<Lease | null> {
    await this.restore();
    const lease = await this.verifier.verify(token, this.licenseId, { machine: this.machine });
    const mark = this.marked;
    if (lease.seq <= mark.seq && lease.issuedAt < mark.issuedAt) {
      if (lease.seq === mark.seq) return null; // the same state, signed a moment earlier (another broker process's clock)
      // An older state's lease, signed before one this app already held: a replay.
      throw new InvalidLeaseError(`older than a lease this app has held (seq ${lease.seq}, seq ${mark.seq} held)`);
    }
    if (!supersedes(lease, this.current, this.nowMs())) return null;
    // The broker's signed iat proves the time; it also resets a watermark left too far ahead by a
    // clock that was once set wrong the other way.
    const next: Mark = { licenseId: this.licenseId, seq: lease.seq, issuedAt: lease.issuedAt, seen: Math.max(this.clockSeconds(), lease.issuedAt) };
    await this.write(next, token);
    this.marked = next;
    this.current = lease;
    return lease;
  }

  /**
   * Drop the lease held and the cached one (this machine was released): the watermark stays, so
   * that no older lease comes back.
   */
  async forget(): Promise<void> {
    await this.restore();
    this.current = null;
    try {
      await this.cache?.clear();
    } catch (error) {
      this.log(`cached lease not removed: ${(error as Error).message}`);
    }
  }

  private async write(mark: Mark, token: string): Promise<void> {
    // The watermark first (see watermark.ts). A full disk must not stop the stream.
    try {
      if (this.watermark !== undefined) {
        await this.watermark.save(mark);
        this.seenWritten = mark.seen;
      }
      await this.cache?.save(token);
    } catch (error) {
      this.log(`lease not written to disk: ${(error as Error).message}`);
    }
  }

  private observe(): void {
    const clock = this.clockSeconds();
    if (clock > this.marked.seen) this.marked = { ...this.marked, seen: clock };
  }

  /**
   * Note the clock's time in the watermark: written every SEEN_WRITE_INTERVAL_S, and as soon as a
   * lease is seen expired (turning the clock back then revives nothing).
   */
  async tick(write = false): Promise<void> {
    this.observe();
    const { seen } = this.marked;
    const written = this.seenWritten;
    const expiredSince = this.current !== null && written < this.current.expiresAt && this.current.expiresAt <= seen;
    if (this.watermark === undefined || !(write || expiredSince || seen - written >= SEEN_WRITE_INTERVAL_S)) return;
    try {
      await this.watermark.save(this.marked);
      this.seenWritten = seen;
    } catch (error) {
      this.log(`watermark not written: ${(error as Error).message}`);
    }
  }
}
