/**
 * What can go wrong talking to the broker, one class per thing an app does differently about it.
 * Each has a `code` (it survives Electron's IPC, where classes do not):
 *
 *     BrokerError                      "broker_error"   any refusal or failure; `status` (null: no answer)
 *     ├── UnauthorizedError            "unauthorized"   401/403: a new token (or the key) is needed
 *     │   └── MachineReleasedError     "machine_released" this machine was deactivated: ask for the key
 *     ├── NotActivatedError            "not_activated"  no machine activated here yet (nothing was sent)
 *     ├── MalformedLicenseKeyError     "malformed_key"  400: a typo (found here before sending, or by the broker)
 *     ├── InvalidLicenseKeyError       "invalid_key"    403: no license has this key (never issued, or replaced)
 *     ├── MachineLimitReachedError     "machine_limit_reached" 409: `machines` in use, `max`: release one
 *     ├── MachineNotFoundError         "no_such_machine" 404: not an active machine of the license
 *     ├── NotOfferedError              "not_offered"    404: buying, trials, the portal or license keys are off on this server: hide the button
 *     ├── TrialUsedError               "trial_used"     409: this machine has had its trial (one per machine, ever)
 *     ├── AlreadyPaidError             "already_paid"   409: a checkout for a license that is paid for: offer the portal
 *     ├── NoCustomerError              "no_customer"    409: the portal of a license with nothing bought: offer Buy
 *     ├── CheckoutExpiredError         "checkout_expired" the checkout ended unpaid (buy()'s `completed`)
 *     ├── RateLimitedError             "rate_limited"   429: too many attempts; `retryAfter` seconds
 *     └── BrokerUnavailableError       "unavailable"    no answer, or 5xx; `retryAfter` when given
 */
import type { Machine } from "./machines.js";
import { machineOf } from "./machines.js";

export interface BrokerErrorOptions {
  status?: number | null;
  body?: Record<string, unknown>;
  retryAfter?: number | null;
}

export class BrokerError extends Error {
  override name = "BrokerError";
  readonly code: string = "broker_error";
  readonly status: number | null;
  readonly body: Record<string, unknown>;

  constructor(message: string, options: BrokerErrorOptions = {}) {
    super(message);
    this.status = options.status ?? null;
    this.body = options.body ?? {};
  }
}

/** 401/403: a new token is needed; reconnecting with this one would never succeed. */
export class UnauthorizedError extends BrokerError {
  override name = "UnauthorizedError";
  override readonly code: string = "unauthorized";
  declare readonly status: number;

  constructor(status: number, message?: string, body?: Record<string, unknown>) {
    super(message ?? `the broker answered ${status}: the token is invalid, expired, or for another license`, { status, body });
  }
}

/**
 * This machine was released (deactivated) on the broker: its token is refused, and the client has
 * forgotten it and its lease. Ask the user for the key again.
 */
export class MachineReleasedError extends UnauthorizedError {
  override name = "MachineReleasedError";
  override readonly code = "machine_released";

  constructor(body?: Record<string, unknown>) {
    super(401, "this machine was released (deactivated): activate it again with the key", body);
  }
}

export class NotActivatedError extends BrokerError {
  override name = "NotActivatedError";
  override readonly code = "not_activated";
}

export class MalformedLicenseKeyError extends BrokerError {
  override name = "MalformedLicenseKeyError";
  override readonly code = "malformed_key";
}

export class InvalidLicenseKeyError extends BrokerError {
  override name = "InvalidLicenseKeyError";
  override readonly code = "invalid_key";
}

/**
 * The license holds its `max` machines already: `machines` lists them (oldest first), so that the
 * app can offer to release one (`release(machine.id, { key })`) and activate again.
 */
export class MachineLimitReachedError extends BrokerError {
  override name = "MachineLimitReachedError";
  override readonly code = "machine_limit_reached";
  readonly machines: Machine[];
  readonly max: number | null;

  constructor(message: string, options: BrokerErrorOptions = {}) {
    super(message, { status: 409, ...options });
    const listed = Array.isArray(this.body.machines) ? (this.body.machines as Record<string, unknown>[]) : [];
    this.machines = listed.map(machineOf);
    this.max = typeof this.body.max === "number" ? this.body.max : null;
  }
}

export class MachineNotFoundError extends BrokerError {
  override name = "MachineNotFoundError";
  override readonly code = "no_such_machine";
}

/** 404: the seller has not turned this on (STRIPE_PRICES, LICENSE_TRIAL_DAYS, STRIPE_API_KEY, LICENSE_KEY_SECRET): hide the button. */
export class NotOfferedError extends BrokerError {
  override name = "NotOfferedError";
  override readonly code = "not_offered";
}

/** 409: this machine (its fingerprint) has had its trial, ever: offer Buy. */
export class TrialUsedError extends BrokerError {
  override name = "TrialUsedError";
  override readonly code = "trial_used";
}

/** 409: the license is paid for already: nothing to buy, manage it with portal(). */
export class AlreadyPaidError extends BrokerError {
  override name = "AlreadyPaidError";
  override readonly code = "already_paid";
}

/** 409: the license has no Stripe customer (a trial, an unpaid checkout): nothing to manage, offer Buy. */
export class NoCustomerError extends BrokerError {
  override name = "NoCustomerError";
  override readonly code = "no_customer";
}

/**
 * The checkout ended unpaid: its time (`expiresAt`, epoch seconds) ran out, or the session was
 * expired (the broker then removed its pending license). Nothing was charged; buy again.
 */
export class CheckoutExpiredError extends BrokerError {
  override name = "CheckoutExpiredError";
  override readonly code = "checkout_expired";
  readonly expiresAt: number;

  constructor(message: string, expiresAt: number) {
    super(message);
    this.expiresAt = expiresAt;
  }
}

export class RateLimitedError extends BrokerError {
  override name = "RateLimitedError";
  override readonly code = "rate_limited";
  readonly retryAfter: number | null;

  constructor(message: string, options: BrokerErrorOptions = {}) {
    super(message, { status: 429, ...options });
    this.retryAfter = options.retryAfter ?? null;
  }
}

export class BrokerUnavailableError extends BrokerError {
  override name = "BrokerUnavailableError";
  override readonly code = "unavailable";
  readonly retryAfter: number | null;

  constructor(message: string, options: BrokerErrorOptions = {}) {
    super(message, options);
    this.retryAfter = options.retryAfter ?? null;
  }
}

/** Retry-After in seconds (the broker never sends the HTTP-date form), capped at an hour. */
export function retryAfterSeconds(value: string | null): number | null {
  if (value === null || value.trim() === "") return null;
  const seconds = Number(value);
  return Number.isFinite(seconds) && seconds >= 0 ? Math.min(seconds, 3600) : null;
}

/** The error for a refusal of the broker's (`body`: its JSON, if any). */
export function errorOf(status: number, body: unknown, headers: Headers = new Headers()): BrokerError {
  const data = typeof body === "object" && body !== null && !Array.isArray(body) ? (body as Record<string, unknown>) : {};
  const message = typeof data.error === "string" && data.error ? data.error : `HTTP ${status}`;
  const retryAfter = retryAfterSeconds(headers.get("retry-after"));
  const options = { status, body: data, retryAfter };
  if (status === 400 && message === "malformed key") return new MalformedLicenseKeyError("malformed key: check it for a typo", options);
  if (status === 403 && message === "invalid key") {
    return new InvalidLicenseKeyError("invalid key: no license has this key (never issued, or replaced)", options);
  }
  if (status === 409 && message === "machine limit reached") return new MachineLimitReachedError(message, options);
  if (status === 401 && message === "machine released") return new MachineReleasedError(data);
  if (status === 401 || status === 403) return new UnauthorizedError(status, `${status}: ${message}`, data);
  if (status === 404 && message === "no such machine") return new MachineNotFoundError(message, options);
  if (status === 404 && /^(buying from the app|trials|the billing portal|license keys) (is|are) off on this server/.test(message)) return new NotOfferedError(message, options);
  if (status === 409 && message === "this machine has had its trial") return new TrialUsedError(message, options);
  if (status === 409 && message.startsWith("this license is paid for already")) return new AlreadyPaidError(message, options);
  if (status === 409 && message.startsWith("this license has no Stripe customer")) return new NoCustomerError(message, options);
  if (status === 429) return new RateLimitedError(`${message} (retry after ${retryAfter} s)`, options);
  if (status >= 500) return new BrokerUnavailableError(`${status}: ${message}`, options);
  return new BrokerError(`${status}: ${message}`, options);
}
