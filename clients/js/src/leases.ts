import type { KeyObject } from "node:crypto";
import { jose } from "./jose.js";
import { type JsonWebKeySet, pinnedKeys } from "./keys.js";

/** A verified lease: what the broker vouched for about one license, until `expiresAt`. */
export interface Lease {
  readonly token: string;
  readonly licenseId: string;
  readonly seq: number;
  readonly status: string;
  readonly entitled: boolean;
  readonly features: readonly string[];
  readonly currentPeriodEnd: string | null;
  /** Epoch seconds, as in the JWS. */
  readonly issuedAt: number;
  readonly expiresAt: number;
  readonly kid: string;
  /**
   * A lease issued to a machine (activated with a key) names it: the machine id and the
   * fingerprint hash the client sent. null for a lease of a subscriber token.
   */
  readonly machineId?: string | null;
  readonly fingerprint?: string | null;
  /** A running trial's lease (startTrial()): when the trial ends, epoch seconds (`expiresAt` is never later). */
  readonly trialEnd?: number | null;
}

/**
 * This machine, as a lease issued to it must name it: the machine id the activation gave, and the
 * fingerprint computed here now (never read from a file: a copy elsewhere computes another).
 */
export interface MachineBinding {
  readonly machineId: string;
  readonly fingerprint: string;
}

/**
 * A lease that names a machine verifies only on that machine; a client that has a machine takes
 * only leases issued to it. So a lease copied to another computer verifies nothing.
 */
export function checkBinding(lease: Lease, machine: MachineBinding | null | undefined): void {
  const named = lease.machineId ?? null;
  const fingerprint = lease.fingerprint ?? null;
  if (!machine) {
    if (named !== null || fingerprint !== null) throw new InvalidLeaseError(`issued to machine ${named}: this client has no machine activated`);
    return;
  }
  if (named !== machine.machineId) throw new InvalidLeaseError(`issued to another machine (${named}, this one is ${machine.machineId})`);
  if (fingerprint === null || fingerprint.toLowerCase() !== machine.fingerprint.toLowerCase()) {
    throw new InvalidLeaseError("issued to another computer: its fingerprint is not this machine's");
  }
}

/**
 * The lease is forged, tampered with, expired, issued in the future, for another license, or
 * signed by a key the app does not pin.
 */
export class InvalidLeaseError extends Error {
  override name = "InvalidLeaseError";
}

/** The lease verifies but its time is over. */
export class LeaseExpiredError extends InvalidLeaseError {
  override name = "LeaseExpiredError";
}

export const ALGORITHM = "EdDSA";
/** How far a lease's `iat` may be ahead of this machine's clock (ms): clocks are never equal. */
export const DEFAULT_MAX_SKEW_MS = 300_000;

export function leaseValidAt(lease: Lease, nowMs: number): boolean {
  return nowMs < lease.expiresAt * 1000;
}

/**
 * Whether `next` should replace `current`: a newer state, a lease signed later (a renewal; or the
 * broker's current state after its database was restored from a backup, whose seq can be lower),
 * or anything once `current` has expired. An older lease (lower seq and earlier `iat`) never wins
 * while the newer one is valid: a user replaying the lease of a state before a refund gains nothing.
 */
export function supersedes(next: Lease, current: Lease | null, nowMs: number): boolean {
  if (current === null || !leaseValidAt(current, nowMs)) return true;
  if (next.seq > current.seq || next.issuedAt > current.issuedAt) return true;
  return next.seq === current.seq && next.issuedAt === current.issuedAt && next.expiresAt >= current.expiresAt;
}

export interface LeaseVerifierOptions {
  /**
   * Public keys pinned in the app: the text `license-broker keys public` prints (comment lines and
   * one or more PEM blocks), as one string or several.
   */
  publicKeys?: string | readonly string[];
  /** A JWKS document shipped with the app (`license-broker keys public --jwks`): pinned too. */
  jwks?: JsonWebKeySet;
  /** Milliseconds since the epoch; the one clock that decides expiry. */
  clock?: () => number;
  /** How far a lease's `iat` may be ahead of the clock (ms); default 5 minutes. */
  maxSkewMs?: number;
}

const REMOVED = ["jwksUrl", "jwksMaxAgeMs", "jwksCooldownMs"];

export interface VerifyOptions {
  /** When expiry is judged (ms); default: the clock. */
  nowMs?: number;
  /** This machine, when the license was activated here with a key. */
  machine?: MachineBinding | null;
}

/**
 * Verifies leases (Ed25519 compact JWS, EdDSA) against the keys pinned in the app, and nothing
 * else: no network. With no key pinned it verifies nothing. The broker's JWKS is never consulted: it is served by whatever answers at the
 * broker's address, so a fake broker (or anyone between the app and the broker) would serve its
 * own key with it, and a key set saved to disk would be as easy to edit as the cached lease. A key
 * rotation ships the next public key in an app update before it signs (docs/desktop.md).
 */
export class LeaseVerifier {
  readonly clock: () => number;
  readonly maxSkewMs: number;
  private readonly pinned: Map<string, KeyObject>;

  constructor(options: LeaseVerifierOptions = {}) {
    const removed = REMOVED.filter((name) => name in (options ?? {}));
    if (removed.length > 0) {
      throw new TypeError(
        `LeaseVerifier: ${removed.join(", ")} no longer exist (0.2): leases verify only with pinned keys, never with the broker's JWKS, which a fake broker serves too`,
      );
    }
    // Every key given must be usable (InvalidKeyError otherwise). None given at all: this verifier
    // verifies nothing, and a client holding it follows the live state only, and says so.
    this.pinned = pinnedKeys(options?.publicKeys, options?.jwks);
    this.clock = options.clock ?? Date.now;
    this.maxSkewMs = options.maxSkewMs ?? DEFAULT_MAX_SKEW_MS;
  }

  /**
   * Kept for the code written for 0.1: the same as `new LeaseVerifier(options)`. `baseUrl` is not
   * used: the broker's JWKS is not trusted.
   */
  static forServer(_baseUrl: string, options: LeaseVerifierOptions = {}): LeaseVerifier {
    return new LeaseVerifier(options);
  }

  /** The thumbprints of the pinned keys. */
  get kids(): Set<string> {
    return new Set(this.pinned.keys());
  }

  /** Kept for the code written for 0.1: the same as verify() (nothing is fetched in either). */
  verifyOffline(token: string, licenseId: string, options: VerifyOptions = {}): Promise<Lease> {
    return this.verify(token, licenseId, options);
  }

  /**
   * The lease, if it verifies with a pinned key, is for `licenseId` (and, for a lease issued to a
   * machine, for `options.machine`: see checkBinding), was not issued after the clock (beyond
   * maxSkewMs) and is unexpired at `nowMs` (default: the clock).
   */
  async verify(token: string, licenseId: string, options: VerifyOptions = {}): Promise<Lease> {
    if (this.pinned.size === 0) {
      throw new InvalidLeaseError("this app pins no lease key: leases are not verified, and nothing unlocks offline (pin what `license-broker keys public` prints)");
    }
    const j = await jose();
    let kid: string;
    try {
      const header = j.decodeProtectedHeader(token);
      if (header.alg !== ALGORITHM) throw new InvalidLeaseError(`algorithm ${String(header.alg)}, expected ${ALGORITHM}`);
      kid = String(header.kid ?? "");
    } catch (error) {
      if (error instanceof InvalidLeaseError) throw error;
      throw new InvalidLeaseError(`not a JWS: ${(error as Error).message}`);
    }
    const key = this.pinned.get(kid);
    if (key === undefined) throw new InvalidLeaseError(`signed by a key this app does not pin (kid ${kid})`);
    let payload: Record<string, unknown>;
    try {
      const verified = await j.compactVerify(token, key, { algorithms: [ALGORITHM] });
      payload = JSON.parse(new TextDecoder().decode(verified.payload)) as Record<string, unknown>;
    } catch (error) {
      throw new InvalidLeaseError(`does not verify: ${(error as Error).message}`);
    }
    if (typeof payload !== "object" || payload === null) throw new InvalidLeaseError("malformed claims");
    if (payload.sub !== licenseId) throw new InvalidLeaseError("for another license");
    if (![payload.seq, payload.exp, payload.iat].every((n) => typeof n === "number" && Number.isFinite(n))) {
      throw new InvalidLeaseError("malformed claims");
    }
    for (const name of ["machine", "fingerprint"]) {
      if (payload[name] !== undefined && payload[name] !== null && typeof payload[name] !== "string") {
        throw new InvalidLeaseError(`malformed claims: ${name}`);
      }
    }
    const lease: Lease = {
      token,
      licenseId,
      seq: payload.seq as number,
      status: typeof payload.status === "string" ? payload.status : "none",
      entitled: payload.entitled === true,
      features: Array.isArray(payload.features) ? payload.features.map(String) : [],
      currentPeriodEnd: typeof payload.current_period_end === "string" ? payload.current_period_end : null,
      issuedAt: payload.iat as number,
      expiresAt: payload.exp as number,
      kid,
      machineId: (payload.machine as string | undefined) ?? null,
      fingerprint: (payload.fingerprint as string | undefined) ?? null,
      trialEnd: typeof payload.trial_end === "number" && Number.isFinite(payload.trial_end) ? payload.trial_end : null,
    };
    checkBinding(lease, options.machine);
    const clock = this.clock();
    if (lease.issuedAt * 1000 > clock + this.maxSkewMs) {
      const ahead = Math.round(lease.issuedAt - clock / 1000);
      throw new InvalidLeaseError(`issued in the future (${ahead} s ahead of this machine's clock): the clock is behind`);
    }
    if (!leaseValidAt(lease, options.nowMs ?? clock)) throw new LeaseExpiredError("expired");
    return lease;
  }
}
