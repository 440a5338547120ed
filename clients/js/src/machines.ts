import { readFile, rm } from "node:fs/promises";
import { writeAtomically } from "./cache.js";

/**
 * This machine's activation, and the machines of a license as the broker lists them.
 *
 * The activation (license id, machine id, machine token) is kept in a file of its own beside the
 * lease cache (`<cache>.machine`), readable by the user only (0600): the token opens the license's
 * stream and its machine routes. The fingerprint is never stored: it is computed again on every
 * start, so the file copied to another computer binds nothing there (leases name the fingerprint).
 * The same JSON as the Python client's: {"license_id", "machine_id", "token"}.
 */

/** A machine of the license, as the broker lists it. */
export interface Machine {
  readonly id: string;
  readonly name: string | null;
  readonly platform: string | null;
  readonly createdAt: string | null;
  readonly lastSeenAt: string | null;
  /** The machine whose token asked (this one). */
  readonly current: boolean;
}

export interface MachineList {
  readonly licenseId: string;
  readonly machines: Machine[];
  readonly used: number;
  /** null: no limit. */
  readonly max: number | null;
}

/**
 * What activate() answered: this machine (`created` false when the same fingerprint was already
 * active: a reinstall is not a new machine) and how many of the license's places are used. The
 * lease, when it verifies, is already held by the client.
 */
export interface Activation {
  readonly licenseId: string;
  readonly machine: Machine;
  readonly created: boolean;
  readonly used: number;
  readonly max: number | null;
  readonly lease: string | null;
}

export interface Credentials {
  readonly licenseId: string;
  readonly machineId: string;
  readonly token: string;
}

const text = (value: unknown): string | null => (typeof value === "string" ? value : null);

export function machineOf(data: Record<string, unknown>): Machine {
  return {
    id: String(data.id),
    name: text(data.name),
    platform: text(data.platform),
    createdAt: text(data.created_at),
    lastSeenAt: text(data.last_seen_at),
    current: data.current === true,
  };
}

/** [iat, exp] of the machine token (epoch seconds), read without verifying (only the broker can: HS256). */
export function tokenTimes(token: string): [number, number] | null {
  try {
    const claims = JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString()) as Record<string, unknown>;
    const exp = Number(claims.exp);
    const iat = Number(claims.iat ?? 0);
    return Number.isFinite(exp) && Number.isFinite(iat) ? [iat, exp] : null;
  } catch {
    return null;
  }
}

/** The activation on disk: JSON, written atomically, mode 0600. */
export class MachineFile {
  constructor(readonly path: string) {}

  async load(): Promise<Credentials | null> {
    try {
      const data = JSON.parse(await readFile(this.path, "utf8")) as Record<string, unknown>;
      if (![data.license_id, data.machine_id, data.token].every((v) => typeof v === "string" && v)) return null;
      return { licenseId: data.license_id as string, machineId: data.machine_id as string, token: data.token as string };
    } catch {
      return null;
    }
  }

  save(credentials: Credentials): Promise<void> {
    const data = { license_id: credentials.licenseId, machine_id: credentials.machineId, token: credentials.token };
    return writeAtomically(this.path, `${JSON.stringify(data)}\n`);
  }

  async clear(): Promise<void> {
    await rm(this.path, { force: true });
  }
}
