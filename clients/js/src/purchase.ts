import { BrokerError, CheckoutExpiredError, MachineReleasedError, RateLimitedError } from "./errors.js";
import type { Lease } from "./leases.js";
import { type Json, MachineRoutes } from "./machine-routes.js";
import type { Credentials } from "./machines.js";

/**
 * Buying, trying and managing from the app (docs/protocol.md): the three routes, and the wait for
 * a checkout's payment on the license's stream. The client (client.ts) keeps the activation they
 * give; this module holds no state but the Retry-After of each route.
 */

/**
 * How long after a checkout's `expires_at` buy()'s `completed` still waits for its payment: a
 * buyer who paid in its last second is unlocked by webhooks that arrive a little later.
 */
export const EXPIRY_GRACE_MS = 60_000;

/** What buy() gives at once: the page to open, and the promise of its payment. */
export interface Purchase {
  /** Stripe Checkout's page: open it in the system browser (Electron: shell.openExternal). */
  readonly checkoutUrl: string;
  readonly licenseId: string;
  readonly machineId: string;
  /** When the checkout stops taking payment (epoch seconds). */
  readonly expiresAt: number;
  /**
   * Resolves when the license is entitled here by the payment: with a pinned key, on the verified
   * lease bound to this machine (given), else on the live state (null). Rejects with
   * CheckoutExpiredError when the checkout ended unpaid. (A rejection nobody awaits is not
   * reported as unhandled: an app may ignore it and follow "entitlement" instead.)
   */
  readonly completed: Promise<Lease | null>;
}

/** What startTrial() gives: the app is entitled now, until `trialEnd`. */
export interface Trial {
  readonly licenseId: string;
  readonly machineId: string;
  /** When the trial ends (epoch seconds): the stream pushes entitled: false then, and offline the lease expires. */
  readonly trialEnd: number;
  /** The trial's lease, verified and held (null without a pinned key). */
  readonly lease: Lease | null;
}

export interface CheckoutStarted {
  readonly credentials: Credentials;
  readonly checkoutUrl: string;
  readonly expiresAt: number;
}

export interface TrialStarted {
  readonly credentials: Credentials;
  readonly lease: string | null;
  readonly trialEnd: number;
}

/** Who is buying: this machine's fingerprint and labels, or (a trial, a lapsed license) its token. */
export interface Buyer {
  readonly fingerprint: string;
  readonly name: string | null;
  readonly platform: string | null;
  readonly auth?: string;
}

const PROTOCOL = "is not what docs/protocol.md says";

/**
 * The machine routes (machine-routes.ts) and these three. A 429's Retry-After is respected: until
 * it has passed, the same route is refused here (RateLimitedError, `retryAfter` what is left)
 * without sending.
 */
export class PurchaseRoutes extends MachineRoutes {
  private readonly notBefore = new Map<string, number>();

  private async bounded<T>(route: string, work: () => Promise<T>): Promise<T> {
    const waitMs = (this.notBefore.get(route) ?? 0) - Date.now();
    if (waitMs > 0) {
      const retryAfter = Math.ceil(waitMs / 1000);
      throw new RateLimitedError(`${route}: the broker asked to wait (retry after ${retryAfter} s)`, { retryAfter });
    }
    try {
      return await work();
    } catch (error) {
      if (error instanceof RateLimitedError && error.retryAfter !== null) this.notBefore.set(route, Date.now() + error.retryAfter * 1000);
      throw error;
    }
  }

  private static body(buyer: Buyer): Json {
    const body: Json = { fingerprint: buyer.fingerprint };
    if (buyer.auth === undefined && buyer.name !== null) body.name = buyer.name;
    if (buyer.auth === undefined && buyer.platform !== null) body.platform = buyer.platform;
    return body;
  }

  /** POST /api/checkout: a pending license and machine (or, with a machine token, that same one) and the session. */
  checkout(buyer: Buyer, price: string | undefined): Promise<CheckoutStarted> {
    return this.bounded("checkout", async () => {
      const body = PurchaseRoutes.body(buyer);
      if (price !== undefined) body.price = price;
      const [status, data] = await this.answer("POST", "/api/checkout", { auth: buyer.auth, body });
      const { license_id: licenseId, machine_id: machineId, token, checkout_url: checkoutUrl, expires_at: expiresAt } = data;
      if (typeof licenseId !== "string" || typeof machineId !== "string" || typeof token !== "string" || typeof checkoutUrl !== "string" || typeof expiresAt !== "number") {
        throw new BrokerError(`the checkout's answer ${PROTOCOL}`, { status });
      }
      return { credentials: { licenseId, machineId, token }, checkoutUrl, expiresAt };
    });
  }

  /** POST /api/trials: a new license, trialing, with this machine on it. */
  trial(buyer: Buyer): Promise<TrialStarted> {
    return this.bounded("trials", async () => {
      const [status, data] = await this.answer("POST", "/api/trials", { body: PurchaseRoutes.body(buyer) });
      const { license_id: licenseId, machine_id: machineId, token, trial_end: trialEnd } = data;
      const ends = typeof trialEnd === "string" ? Date.parse(trialEnd) : Number.NaN;
      if (typeof licenseId !== "string" || typeof machineId !== "string" || typeof token !== "string" || !Number.isFinite(ends)) {
        throw new BrokerError(`the trial's answer ${PROTOCOL}`, { status });
      }
      return { credentials: { licenseId, machineId, token }, lease: typeof data.lease === "string" ? data.lease : null, trialEnd: ends / 1000 };
    });
  }

  /** POST /api/portal: a Billing Portal session's URL for the license's customer. */
  portal(auth: string): Promise<string> {
    return this.bounded("portal", async () => {
      const [status, data] = await this.answer("POST", "/api/portal", { auth });
      if (typeof data.url !== "string") throw new BrokerError(`the portal's answer ${PROTOCOL}`, { status });
      return data.url;
    });
  }
}

/** What the wait reads of the client (LicenseClient). */
export interface Followed {
  readonly trust: "pinned" | "unverified";
  readonly lease: Lease | null;
  readonly state: { license_id: string; seq: number; entitled: boolean; state?: Record<string, unknown> } | null;
  readonly unauthorized: Error | null;
  isEntitled(): boolean;
  on(event: "lease" | "state" | "entitlement" | "status", listener: () => void): unknown;
  off(event: "lease" | "state" | "entitlement" | "status", listener: () => void): unknown;
}

export interface Awaited {
  readonly licenseId: string;
  readonly machineId: string;
  readonly expiresAt: number;
  /** The newest seq known of the license before the checkout (-1: a new license): only later states count. */
  readonly sinceSeq: number;
  /** The checkout's pending license was removed (its machine "released"): the client waits for a key again. */
  readonly onRemoved: () => void;
  readonly graceMs?: number;
}

/**
 * Settles once the payment entitles the license here: a verified lease bound to this machine (or,
 * without a pinned key, the live state), newer than the checkout and not a trial's. Rejects with
 * CheckoutExpiredError when the broker removes the unpaid checkout's license (the stream is refused
 * "machine released"), or `graceMs` after `expiresAt`.
 */
export function untilPaid(client: Followed, wanted: Awaited): Promise<Lease | null> {
  const paid = (): [boolean, Lease | null] => {
    if (client.trust === "pinned") {
      const lease = client.lease;
      const fresh = lease !== null && lease.licenseId === wanted.licenseId && lease.machineId === wanted.machineId;
      return fresh && lease.entitled && lease.seq > wanted.sinceSeq && lease.trialEnd == null && client.isEntitled() ? [true, lease] : [false, null];
    }
    const state = client.state;
    const fresh = state !== null && state.license_id === wanted.licenseId && state.seq > wanted.sinceSeq;
    return [fresh && state.entitled && state.state?.kind !== "trial", null];
  };
  const completed = new Promise<Lease | null>((resolve, reject) => {
    const check = (): void => {
      const [done, lease] = paid();
      if (done) {
        finish();
        resolve(lease);
      }
    };
    const onStatus = (): void => {
      if (!(client.unauthorized instanceof MachineReleasedError) || wanted.sinceSeq >= 0) return;
      finish();
      wanted.onRemoved();
      reject(new CheckoutExpiredError("the checkout ended unpaid: the broker removed its license", wanted.expiresAt));
    };
    const endsInMs = wanted.expiresAt * 1000 + (wanted.graceMs ?? EXPIRY_GRACE_MS) - Date.now();
    const timer = setTimeout(() => {
      finish();
      reject(new CheckoutExpiredError(`the checkout ended unpaid at ${new Date(wanted.expiresAt * 1000).toISOString()}`, wanted.expiresAt));
    }, Math.max(endsInMs, 0));
    timer.unref();
    const finish = (): void => {
      clearTimeout(timer);
      for (const event of ["lease", "state", "entitlement"] as const) client.off(event, check);
      client.off("status", onStatus);
    };
    for (const event of ["lease", "state", "entitlement"] as const) client.on(event, check);
    client.on("status", onStatus);
    check();
  });
  completed.catch(() => undefined); // awaited by the app, or not: never an unhandled rejection
  return completed;
}
