export { LeaseCache } from "./cache.js";
export {
  type ClientStatus,
  type ClientTrust,
  LicenseClient,
  type LicenseClientOptions,
  type LicenseState,
} from "./client.js";
export {
  AlreadyPaidError,
  BrokerError,
  type BrokerErrorOptions,
  BrokerUnavailableError,
  CheckoutExpiredError,
  InvalidLicenseKeyError,
  MachineLimitReachedError,
  MachineNotFoundError,
  MachineReleasedError,
  MalformedLicenseKeyError,
  NoCustomerError,
  NotActivatedError,
  NotOfferedError,
  RateLimitedError,
  TrialUsedError,
  UnauthorizedError,
} from "./errors.js";
export { type Exec, MachineIdError, type MachineIdOptions, machineFingerprint, osMachineId } from "./fingerprint.js";
export { LeaseHolder } from "./holder.js";
export { InvalidKeyError, type JsonWebKeySet, keyId } from "./keys.js";
export {
  checkBinding,
  DEFAULT_MAX_SKEW_MS,
  InvalidLeaseError,
  type Lease,
  LeaseExpiredError,
  LeaseVerifier,
  type LeaseVerifierOptions,
  leaseValidAt,
  type MachineBinding,
  supersedes,
  type VerifyOptions,
} from "./leases.js";
export { normalizeLicenseKey } from "./license-key.js";
export { type Activation, type Credentials, type Machine, MachineFile, type MachineList } from "./machines.js";
export { EXPIRY_GRACE_MS, type Purchase, type Trial } from "./purchase.js";
export { type Mark, Watermark } from "./watermark.js";
