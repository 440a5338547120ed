import { readFile } from "node:fs/promises";
import { writeAtomically } from "./cache.js";

/**
 * The watermark: on disk, in a file of its own apart from the lease cache, the newest lease this
 * app has held (its seq and `iat`) and the latest time it has seen (epoch seconds). The same JSON
 * as the Python client's: {"license_id", "seq", "issued_at", "seen"}.
 *
 * It makes replaying an old lease and turning the clock back useless offline: a cached lease
 * older than the watermark is refused (a lease file copied back from before a refund), and time
 * never runs backwards for a lease (a clock earlier than the latest time seen, beyond the allowed
 * skew, was turned back: no lease counts until it is right). It cannot stop someone who restores
 * every file of the app from a backup; nothing on the machine alone can.
 *
 * Written before the lease cache: a crash between the two leaves a cached lease below the
 * watermark, which is refused (locked until the next connection), never an old lease accepted.
 */
export interface Mark {
  readonly licenseId: string | null;
  readonly seq: number;
  /** Epoch seconds. */
  readonly issuedAt: number;
  readonly seen: number;
}

export class Watermark {
  constructor(readonly path: string) {}

  /** null when there is no usable record (missing, unreadable, or not this format). */
  async load(): Promise<Mark | null> {
    try {
      const data = JSON.parse(await readFile(this.path, "ascii")) as Record<string, unknown>;
      const [seq, issuedAt, seen] = [data.seq, data.issued_at, data.seen].map(Number) as [number, number, number];
      if (typeof data.license_id !== "string" || ![seq, issuedAt, seen].every(Number.isFinite)) return null;
      return { licenseId: data.license_id, seq, issuedAt, seen };
    } catch {
      return null;
    }
  }

  save(mark: Mark): Promise<void> {
    const data = { license_id: mark.licenseId, seq: mark.seq, issued_at: mark.issuedAt, seen: mark.seen };
    return writeAtomically(this.path, `${JSON.stringify(data)}\n`);
  }
}
