import { jose } from "./jose.js";

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
}

export interface JsonWebKeySet {
  keys: Array<Record<string, unknown>>;
}

/** The lease is forged, tampered with, expired, for another license, or signed by an unknown key. */
export class InvalidLeaseError extends Error {
  override name = "InvalidLeaseError";
}

export const ALGORITHM = "EdDSA";
export const JWKS_PATH = "/.well-known/jwks.json";

export function leaseValidAt(lease: Lease, nowMs: number): boolean {
  return nowMs < lease.expiresAt * 1000;
}

/**
 * Whether `next` should replace `current`: a newer state, the same state renewed, or anything
 * once `current` has expired. An older state's lease never wins while the newer one is valid
 * (a user replaying the lease of a state before a refund gains nothing).
 */
export function supersedes(next: Lease, current: Lease | null, nowMs: number): boolean {
  if (current === null || !leaseValidAt(current, nowMs)) return true;
  return next.seq > current.seq || (next.seq === current.seq && next.expiresAt >= current.expiresAt);
}

export interface LeaseVerifierOptions {
  /** Public keys pinned in the app (SPKI PEM, from `license-broker keys generate`): they work offline. */
  publicKeys?: readonly string[];
  /** A JWKS document shipped with the app: pinned too. */
  jwks?: JsonWebKeySet;
  /** The broker's JWKS, fetched when a lease names an unknown key or the set is older than jwksMaxAgeMs. */
  jwksUrl?: string;
  jwksMaxAgeMs?: number;
  /** The least time between two fetches of the JWKS for unknown keys (jose's cooldown). */
  jwksCooldownMs?: number;
  /** Milliseconds since the epoch; the one clock that decides expiry. */
  clock?: () => number;
}

type Jose = Awaited<ReturnType<typeof jose>>;
type VerifyKey = Awaited<ReturnType<Jose["importJWK"]>>;
type RemoteKeys = ReturnType<Jose["createRemoteJWKSet"]>;

/**
 * Verifies leases: Ed25519 compact JWS (EdDSA) signed by the broker. Pinned keys are the only way
 * to verify a cached lease offline: a key set saved to disk would be as easy to edit as the lease.
 * A JWKS URL follows a rotation online: a key the broker stops publishing stops verifying once the
 * fetched set is older than `jwksMaxAgeMs`.
 */
export class LeaseVerifier {
  readonly clock: () => number;
  private readonly options: LeaseVerifierOptions;
  private pinned: Promise<Map<string, VerifyKey>> | undefined;
  private remote: RemoteKeys | undefined;

  constructor(options: LeaseVerifierOptions) {
    if (!options.publicKeys?.length && !options.jwks && !options.jwksUrl) {
      throw new TypeError("LeaseVerifier needs publicKeys, a jwks or a jwksUrl");
    }
    this.options = options;
    this.clock = options.clock ?? Date.now;
  }

  /** The broker's own JWKS, plus any options (pinned keys, for offline use). */
  static forServer(baseUrl: string, options: Omit<LeaseVerifierOptions, "jwksUrl"> = {}): LeaseVerifier {
    return new LeaseVerifier({ ...options, jwksUrl: baseUrl.replace(/\/+$/, "") + JWKS_PATH });
  }

  /** Verify with pinned keys only: no network (what an app started offline can do). */
  verifyOffline(token: string, licenseId: string): Promise<Lease> {
    return this.verifyWith(token, licenseId, false);
  }

  /** Verify with pinned keys, or else the broker's JWKS (fetched when needed). */
  verify(token: string, licenseId: string): Promise<Lease> {
    return this.verifyWith(token, licenseId, true);
  }

  private async pinnedKeys(): Promise<Map<string, VerifyKey>> {
    this.pinned ??= (async () => {
      const { importSPKI, importJWK, exportJWK, calculateJwkThumbprint } = await jose();
      const keys = new Map<string, VerifyKey>();
      for (const pem of this.options.publicKeys ?? []) {
        const key = await importSPKI(pem, ALGORITHM);
        keys.set(await calculateJwkThumbprint(await exportJWK(key)), key);
      }
      for (const jwk of this.options.jwks?.keys ?? []) {
        if (jwk.kty !== "OKP" || jwk.crv !== "Ed25519") continue;
        // By thumbprint, not by the document's kid: a kid cannot alias another key.
        const kid = await calculateJwkThumbprint({ kty: "OKP", crv: "Ed25519", x: String(jwk.x) });
        keys.set(kid, await importJWK({ kty: "OKP", crv: "Ed25519", x: String(jwk.x) }, ALGORITHM));
      }
      return keys;
    })();
    return this.pinned;
  }

  private async verifyWith(token: string, licenseId: string, online: boolean): Promise<Lease> {
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
    const pinned = (await this.pinnedKeys()).get(kid);
    let resolve: VerifyKey | RemoteKeys;
    if (pinned !== undefined) {
      resolve = pinned;
    } else if (online && this.options.jwksUrl) {
      // jose's remote set: fetched on an unknown kid (at most once per cooldown) and again once
      // older than cacheMaxAge, so a key removed from the JWKS stops verifying.
      this.remote ??= j.createRemoteJWKSet(new URL(this.options.jwksUrl), {
        cacheMaxAge: this.options.jwksMaxAgeMs ?? 300_000,
        cooldownDuration: this.options.jwksCooldownMs ?? 30_000,
      });
      resolve = this.remote;
    } else {
      throw new InvalidLeaseError(`signed by an unknown key (kid ${kid})`);
    }
    let payload: Record<string, unknown>;
    try {
      const options = { algorithms: [ALGORITHM], currentDate: new Date(this.clock()), requiredClaims: ["sub", "seq", "exp", "iat"] };
      ({ payload } = typeof resolve === "function" ? await j.jwtVerify(token, resolve, options) : await j.jwtVerify(token, resolve, options));
    } catch (error) {
      if (error instanceof j.errors.JWTExpired) throw new InvalidLeaseError("expired");
      if (error instanceof j.errors.JWKSNoMatchingKey) throw new InvalidLeaseError(`signed by an unknown key (kid ${kid})`);
      throw new InvalidLeaseError(`does not verify: ${(error as Error).message}`);
    }
    if (payload.sub !== licenseId) throw new InvalidLeaseError("for another license");
    if (typeof payload.seq !== "number" || typeof payload.exp !== "number" || typeof payload.iat !== "number") {
      throw new InvalidLeaseError("malformed claims");
    }
    return {
      token,
      licenseId,
      seq: payload.seq,
      status: typeof payload.status === "string" ? payload.status : "none",
      entitled: payload.entitled === true,
      features: Array.isArray(payload.features) ? payload.features.map(String) : [],
      currentPeriodEnd: typeof payload.current_period_end === "string" ? payload.current_period_end : null,
      issuedAt: payload.iat,
      expiresAt: payload.exp,
      kid,
    };
  }
}
