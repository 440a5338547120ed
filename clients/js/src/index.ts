export { LeaseCache } from "./cache.js";
export { type ClientStatus, LicenseClient, type LicenseClientOptions, type LicenseState, UnauthorizedError } from "./client.js";
export {
  InvalidLeaseError,
  type JsonWebKeySet,
  type Lease,
  LeaseVerifier,
  type LeaseVerifierOptions,
  leaseValidAt,
  supersedes,
} from "./leases.js";
