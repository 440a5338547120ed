export { LeaseCache } from "./cache.js";
export {
  type ClientStatus,
  type ClientTrust,
  LicenseClient,
  type LicenseClientOptions,
  type LicenseState,
  UnauthorizedError,
} from "./client.js";
export { LeaseHolder } from "./holder.js";
export { InvalidKeyError, type JsonWebKeySet, keyId } from "./keys.js";
export {
  DEFAULT_MAX_SKEW_MS,
  InvalidLeaseError,
  type Lease,
  LeaseExpiredError,
  LeaseVerifier,
  type LeaseVerifierOptions,
  leaseValidAt,
  supersedes,
} from "./leases.js";
export { type Mark, Watermark } from "./watermark.js";
