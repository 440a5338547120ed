import { EventEmitter } from "node:events";
import { EventSource } from "eventsource";
import { LeaseCache } from "./cache.js";
import { BrokerError, errorOf, MachineNotFoundError, MachineReleasedError, NotActivatedError, UnauthorizedError } from "./errors.js";
import { LeaseHolder } from "./holder.js";
import { InvalidLeaseError, type Lease, type LeaseVerifier } from "./leases.js";
import { normalizeLicenseKey } from "./license-key.js";
import { bearer, licenseAuth } from "./machine-routes.js";
import { type Activation, type Credentials, MachineFile, type MachineList } from "./machines.js";
import { type Purchase, PurchaseRoutes, type Trial, untilPaid } from "./purchase.js";
import { defaultName, ThisMachine } from "./this-machine.js";
import { Watermark } from "./watermark.js";

export { UnauthorizedError } from "./errors.js";

/** One event of the stream: the license's state after a change (or its current state). */
export interface LicenseState {
  license_id: string;
  seq: number;
  status: string;
  entitled: boolean;
  stripe_event_type?: string | null;
  state?: Record<string, unknown>;
  [field: string]: unknown;
}

/** "inactive": a client created with `appId` that has no machine activated yet waits for activate(). */
export type ClientStatus = "inactive" | "connecting" | "live" | "reconnecting" | "unauthorized" | "stopped";
/** "pinned": leases verified with pinned keys; "unverified": no verifier, the live state only. */
export type ClientTrust = "pinned" | "unverified";

/** The expiry timer wakes at least this often: a machine that slept, or a moved clock, is noticed. */
const EXPIRY_CHECK_MS = 60_000;

export interface LicenseClientOptions {
  /** The broker, e.g. "https://licenses.example.com". */
  baseUrl: string;
  /** The license, with a subscriber token from your web app (`token`); or else `appId`. */
  licenseId?: string;
  /** A subscriber token, or a function asked for one on every connection (so expired ones are replaced). */
  token?: string | (() => string | Promise<string>);
  /**
   * License keys instead of a token: your app's own salt for the machine fingerprint (e.g.
   * "com.example.draw"). The license and its machine token then come from activate(key).
   */
  appId?: string;
  /** Replaces the OS machine id (a system the client does not know). */
  machineId?: string;
  /** Where the activation is kept (a path or a MachineFile); default: beside the cache, `<cache>.machine`. */
  machineFile?: MachineFile | string;
  /**
   * Verifies leases with the keys pinned in the app. Without one (or with one given no key),
   * isEntitled() follows the last (unsigned) state, online only, and the client says so (a
   * process warning, `trust`).
   */
  verifier?: LeaseVerifier;
  /** Where the last valid lease is kept (a path or a LeaseCache). */
  cache?: LeaseCache | string;
  /** Where the watermark is kept (a path or a Watermark); default: beside the cache, `<cache>.watermark`. */
  watermark?: Watermark | string;
  /** Resume after this seq (e.g. saved by a previous run). */
  lastEventId?: number | null;
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /** Longer than the server's heartbeat (15 s): silence beyond it means a dead connection. */
  readTimeoutMs?: number;
  fetch?: typeof fetch;
}

interface ClientEvents {
  state: [LicenseState];
  lease: [Lease];
  entitlement: [boolean];
  status: [ClientStatus];
  rejected: [InvalidLeaseError];
}

/**
 * Follows one license: the live state over SSE (eventsource), resumed with Last-Event-ID after
 * every reconnect, which backs off with jitter from the server's `retry:` hint; signed leases
 * verified and cached, so that isEntitled() answers offline until the lease expires.
 *
 * Events: "state" (each state, in seq order, once), "lease" (each lease that verifies and
 * replaces the one held), "entitlement" (isEntitled() changed: the moment to lock or unlock; also
 * when the lease runs out, from the client's own expiry timer), "status", "rejected" (a lease that
 * did not verify). Or iterate: `for await (const state of client)`.
 */
export class LicenseClient extends EventEmitter<ClientEvents> {
  readonly baseUrl: string;
  readonly appId: string | undefined;
  readonly verifier: LeaseVerifier | undefined;
  readonly cache: LeaseCache | undefined;
  readonly watermark: Watermark | undefined;
  readonly trust: ClientTrust;
  state: LicenseState | null = null;
  lastEventId: number | null;
  /** The server's `retry:` hint, in ms, once one has arrived. */
  retryMs: number | null = null;
  connections = 0;
  rejectedLeases = 0;
  status: ClientStatus = "stopped";
  unauthorized: UnauthorizedError | null = null;
  private holder: LeaseHolder | undefined;
  private readonly pinned: boolean;
  private readonly tokenLicenseId: string | undefined;
  private readonly machine: ThisMachine | undefined;
  private readonly routes: PurchaseRoutes;
  /** The refusal of the last stream request (its body says "machine released" or not). */
  private refusal: BrokerError | null = null;
  private entitled = false; // the app starts locked; "entitlement" reports each change from there
  private accepting: Promise<void> = Promise.resolve();
  private expiryTimer: NodeJS.Timeout | null = null;
  private readonly options: Required<Pick<LicenseClientOptions, "minBackoffMs" | "maxBackoffMs" | "readTimeoutMs">>;
  private readonly token: LicenseClientOptions["token"];
  private readonly fetchImpl: typeof fetch;
  private source: EventSource | null = null;
  private watchdog: NodeJS.Timeout | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private failures = 0;
  private openedAt = 0;
  private running = false;

  constructor(options: LicenseClientOptions) {
    super();
    const tokenMode = options.licenseId !== undefined || options.token !== undefined;
    if (options.appId === undefined && (options.licenseId === undefined || options.token === undefined)) {
      throw new TypeError("LicenseClient: give licenseId and token (from your web app), or appId (license keys)");
    }
    if (options.appId !== undefined && tokenMode) {
      throw new TypeError("LicenseClient: with appId the license and its token come from activate(key)");
    }
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.tokenLicenseId = options.licenseId;
    this.token = options.token;
    this.appId = options.appId;
    this.verifier = options.verifier;
    this.cache = typeof options.cache === "string" ? new LeaseCache(options.cache) : options.cache;
    const watermark = options.watermark ?? (this.cache ? `${this.cache.path}.watermark` : undefined);
    this.watermark = typeof watermark === "string" ? new Watermark(watermark) : watermark;
    this.fetchImpl = options.fetch ?? globalThis.fetch;
    this.routes = new PurchaseRoutes(this.baseUrl, (input, init) => this.fetchImpl(input, init));
    if (options.appId !== undefined) {
      const machineFile = options.machineFile ?? (this.cache ? `${this.cache.path}.machine` : undefined);
      const file = typeof machineFile === "string" ? new MachineFile(machineFile) : machineFile;
      this.machine = new ThisMachine(options.appId, this.routes, file, options.machineId, (m) => this.emitWarning(m));
    }
    // Without a pinned key (no verifier, or one given no key) leases prove nothing: the client
    // follows the live state only, and says so.
    this.pinned = this.verifier !== undefined && this.verifier.kids.size > 0;
    this.trust = this.pinned ? "pinned" : "unverified";
    if (this.pinned && this.verifier && options.licenseId !== undefined) {
      this.holder = new LeaseHolder(options.licenseId, this.verifier, this.cache, this.watermark, (m) => this.emitWarning(m));
    }
    if (!this.pinned) {
      process.emitWarning(
        `license-broker-client: no pinned lease key: leases are not verified, the app follows the live state only, which anything answering at ${options.baseUrl} can fake, and it never unlocks offline. Pin the broker's public key: new LeaseVerifier({ publicKeys: [<what \`license-broker keys public\` prints>] }).`,
        { code: "LICENSE_BROKER_UNVERIFIED" },
      );
    }
    this.lastEventId = options.lastEventId ?? null;
    this.options = {
      minBackoffMs: options.minBackoffMs ?? 500,
      maxBackoffMs: options.maxBackoffMs ?? 30_000,
      readTimeoutMs: options.readTimeoutMs ?? 45_000,
    };
  }

  /** The license followed. With appId, the activated one: NotActivatedError before activate() (or restore()). */
  get licenseId(): string {
    if (this.machine === undefined) return this.tokenLicenseId as string;
    const credentials = this.machine.credentials;
    if (credentials === null) throw new NotActivatedError("no machine is activated here: activate(key) first");
    return credentials.licenseId;
  }

  get url(): string {
    return `${this.baseUrl}/api/licenses/${encodeURIComponent(this.licenseId)}/events`;
  }

  /** A machine is activated here (with appId; known after restore()): the client has a license to follow. */
  get activated(): boolean {
    return this.machine?.credentials != null;
  }

  get machineId(): string | null {
    return this.machine?.credentials?.machineId ?? null;
  }

  /** This machine's fingerprint (with appId, after restore() or activate()): what activations send and leases name. */
  get fingerprint(): string | null {
    return this.machine?.fingerprint ?? null;
  }

  /**
   * The holder of the license followed now: with appId, one per activation (license and machine),
   * bound to this machine. Created before its restore(); holder.accept() restores first.
   */
  private currentHolder(): LeaseHolder | undefined {
    if (this.machine === undefined || !this.pinned || this.verifier === undefined) return this.holder;
    const credentials = this.machine.credentials;
    const binding = this.machine.binding();
    if (credentials === null || binding === null) return undefined;
    const held = this.holder;
    if (held?.licenseId !== credentials.licenseId || held.machine?.machineId !== binding.machineId) {
      this.holder = new LeaseHolder(credentials.licenseId, this.verifier, this.cache, this.watermark, (m) => this.emitWarning(m), binding);
    }
    return this.holder;
  }

  /** The newest valid lease: received on the stream, or restored from the cache. */
  get lease(): Lease | null {
    return this.currentHolder()?.lease ?? null;
  }

  /**
   * Whether the app may unlock now. With a pinned key: only on a valid, unexpired lease for this
   * license, online or off (await restore() first at start-up), with a clock that was not turned
   * back. Without one: the last state received, unsigned, online only.
   */
  isEntitled(): boolean {
    if (!this.pinned) return this.state?.entitled === true;
    return this.currentHolder()?.isEntitled() ?? false;
  }

  /**
   * Read the watermark and the cached lease, verified with the pinned keys (no network); with
   * appId, the activation first, and this machine's fingerprint. Once; start() calls it too.
   */
  async restore(): Promise<Lease | null> {
    if (this.machine !== undefined) {
      await this.machine.load();
      try {
        await this.machine.computeFingerprint();
      } catch (error) {
        this.emitWarning(`no machine fingerprint, so no lease counts: ${(error as Error).message}`);
      }
    }
    const holder = this.currentHolder();
    if (holder === undefined) return null;
    const lease = await holder.restore();
    this.checkEntitlement();
    return lease;
  }

  /**
   * Verify a lease (from the stream, or GET /api/licenses/{id}'s `lease`); cache it and hold it if
   * it supersedes the one held. One at a time, in arrival order, so the cache ends with the newest.
   */
  acceptLease(token: string): Promise<Lease | null> {
    return this.serially(() => this.acceptOne(token));
  }

  private serially<T>(work: () => Promise<T>): Promise<T> {
    const done = this.accepting.then(work);
    this.accepting = done.then(
      () => undefined,
      () => undefined,
    );
    return done;
  }

  private async acceptOne(token: string): Promise<Lease | null> {
    const holder = this.currentHolder();
    if (holder === undefined) return null;
    let lease: Lease | null;
    try {
      lease = await holder.accept(token);
    } catch (error) {
      if (!(error instanceof InvalidLeaseError)) throw error;
      this.rejectedLeases += 1;
      this.emit("rejected", error);
      return null;
    }
    if (lease !== null) {
      this.emit("lease", lease);
      this.armExpiry();
    }
    this.checkEntitlement();
    return lease;
  }

  private checkEntitlement(): void {
    const entitled = this.isEntitled();
    if (entitled === this.entitled) return;
    this.entitled = entitled;
    this.emit("entitlement", entitled);
  }

  private emitWarning(message: string): void {
    process.emitWarning(`license-broker-client: ${message}`, { code: "LICENSE_BROKER_LEASE" });
  }

  /** The lease-expiry timer: the app is told when its lease runs out (offline that long). */
  private armExpiry(): void {
    if (this.expiryTimer !== null) clearTimeout(this.expiryTimer);
    this.expiryTimer = null;
    const holder = this.currentHolder();
    if (!this.running || holder === undefined) return;
    const left = holder.msLeft();
    const delay = left === null ? EXPIRY_CHECK_MS : Math.min(Math.max(left, 0) + 50, EXPIRY_CHECK_MS);
    this.expiryTimer = setTimeout(() => {
      this.expiryTimer = null;
      void this.serially(async () => {
        await this.currentHolder()?.tick();
        this.checkEntitlement();
      }).finally(() => this.armExpiry());
    }, delay);
    this.expiryTimer.unref();
  }

  /**
   * Milliseconds to wait after `failures` connections in a row ended without an event: the
   * server's `retry:` hint (else minBackoffMs) doubled per failure up to maxBackoffMs, then
   * "equal jitter", between half and all of it, so that clients cut off together spread out.
   */
  reconnectDelay(failures: number): number {
    const base = this.retryMs ?? this.options.minBackoffMs;
    const ceiling = Math.min(base * 2 ** (failures - 1), this.options.maxBackoffMs);
    return ceiling * (0.5 + Math.random() / 2);
  }

  /** Restore the cached lease, then connect, and reconnect until stop() or a 401/403. */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.unauthorized = null;
    this.failures = 0;
    void this.restore().finally(() => {
      this.armExpiry();
      if (this.running && this.source === null && this.reconnectTimer === null) this.connect();
    });
  }

  // --- keys and machines (docs/protocol.md) ------------------------------------------------

  private thisMachine(): ThisMachine {
    if (this.machine === undefined) throw new TypeError("this client follows a token from your web app: create it with appId to use keys");
    return this.machine;
  }

  /**
   * Bind this machine to the license of `key` (the same machine again after a reinstall), keep its
   * token beside the cache and hold the lease the broker issued to it; a started client follows the
   * license from here. Throws MalformedLicenseKeyError (before sending), InvalidLicenseKeyError,
   * MachineLimitReachedError (`.machines`: release one with `release(id, { key })`, then activate
   * again), RateLimitedError (`.retryAfter`), BrokerUnavailableError, MachineIdError. `name`
   * defaults to the computer's name, `platform` to process.platform.
   */
  async activate(key: string, options: { name?: string | null; platform?: string } = {}): Promise<Activation> {
    const machine = this.thisMachine();
    await machine.load();
    const { activation, credentials } = await machine.activate(key, options.name, options.platform);
    await this.adopt(credentials, activation.lease);
    return activation;
  }

  /** Keeps an activation (a key's, a checkout's, a trial's) and its lease; a started client follows it. */
  private async adopt(credentials: Credentials, lease: string | null): Promise<void> {
    const machine = this.thisMachine();
    const previous = machine.credentials;
    await machine.store(credentials);
    const otherLicense = previous?.licenseId !== credentials.licenseId;
    if (otherLicense) {
      this.state = null; // another license: its own seqs
      this.lastEventId = null;
    }
    if (lease !== null) await this.acceptLease(lease);
    this.checkEntitlement();
    if ((otherLicense || previous?.machineId !== credentials.machineId) && this.running) this.reconnectNow();
  }

  // --- buying, trying and managing from the app (purchase.ts) -------------------------------

  /**
   * A Stripe Checkout for this machine (`price`: one of the broker's STRIPE_PRICES; default its
   * first): open `checkoutUrl` in the browser at once; `completed` resolves when the payment
   * entitles the license here (or rejects with CheckoutExpiredError). The license and machine are
   * kept as an activation's, and the client is started if it was not: the payment arrives on the
   * stream. With a license here (a trial, a lapsed one) the checkout is for that license. Throws
   * NotOfferedError, AlreadyPaidError (manage it with portal()), RateLimitedError (`.retryAfter`),
   * BrokerUnavailableError, MachineIdError.
   */
  async buy(price?: string, options: { name?: string | null; platform?: string } = {}): Promise<Purchase> {
    const machine = this.thisMachine();
    await machine.load();
    const fingerprint = await machine.computeFingerprint();
    const held = machine.credentials;
    const name = options.name === undefined ? defaultName() : options.name;
    const auth = held === null ? undefined : bearer(await this.streamToken());
    const sinceSeq = held === null ? -1 : Math.max(this.lease?.seq ?? -1, this.state?.seq ?? -1);
    const started = await this.forgettingIfReleased(() => this.routes.checkout({ fingerprint, name, platform: options.platform ?? process.platform, auth }, price));
    await this.adopt(started.credentials, null);
    const { licenseId, machineId } = started.credentials;
    const completed = untilPaid(this, { licenseId, machineId, expiresAt: started.expiresAt, sinceSeq, onRemoved: () => this.awaitKey() });
    if (!this.running) this.start();
    return { checkoutUrl: started.checkoutUrl, licenseId, machineId, expiresAt: started.expiresAt, completed };
  }

  /**
   * A trial without a card, on this machine: entitled at once (its lease held) until `trialEnd`,
   * when the stream locks the app (offline: the lease expires then). Throws NotOfferedError
   * (trials off), TrialUsedError (this machine had one, ever), RateLimitedError, BrokerUnavailableError.
   */
  async startTrial(options: { name?: string | null; platform?: string } = {}): Promise<Trial> {
    const machine = this.thisMachine();
    await machine.load();
    const fingerprint = await machine.computeFingerprint();
    const name = options.name === undefined ? defaultName() : options.name;
    const started = await this.routes.trial({ fingerprint, name, platform: options.platform ?? process.platform });
    await this.adopt(started.credentials, started.lease);
    const { licenseId, machineId } = started.credentials;
    return { licenseId, machineId, trialEnd: started.trialEnd, lease: this.lease };
  }

  /** The Billing Portal's URL for this license (open it in the browser). NoCustomerError before a purchase. */
  portal(): Promise<string> {
    return this.forgettingIfReleased(async () => this.routes.portal(await this.authorization()));
  }

  /** An unpaid checkout's license was removed: a client stopped by its refused stream waits for a key (or a buy) again. */
  private awaitKey(): void {
    this.unauthorized = null;
    this.running = true;
    this.setStatus("inactive");
  }

  /**
   * The license's machines (oldest first; `current` is this one). With `key`: for an app whose
   * activation met the limit, which has no token yet.
   */
  machines(options: { key?: string } = {}): Promise<MachineList> {
    return this.forgettingIfReleased(async () => this.routes.machines(await this.authorization(options.key)));
  }

  /**
   * Release (deactivate) a machine of the license: its token is refused at once and its streams
   * end. This machine's own id: the client forgets its activation and its lease.
   */
  async release(machineId: string, options: { key?: string } = {}): Promise<void> {
    const own = machineId === this.machineId;
    try {
      await this.forgettingIfReleased(async () => this.routes.release(machineId, await this.authorization(options.key)));
    } catch (error) {
      if (own && error instanceof MachineNotFoundError) await this.forgetOwn(); // released already, elsewhere
      throw error;
    }
    if (own) await this.forgetOwn();
  }

  /** Release this machine (its place is free for another) and forget the activation. */
  async deactivate(): Promise<void> {
    await this.thisMachine().load();
    const machineId = this.machineId;
    if (machineId === null) throw new NotActivatedError("no machine is activated here");
    try {
      await this.release(machineId);
    } catch (error) {
      if (!(error instanceof MachineNotFoundError)) throw error;
    }
  }

  /**
   * A fresh machine token now (POST /api/machines/{id}/token), and the lease with it. The client
   * renews by itself: on the stream, and before connecting once half of it is spent.
   */
  async renewToken(): Promise<void> {
    const machine = this.thisMachine();
    await machine.load();
    const current = machine.credentials;
    if (current === null) throw new NotActivatedError("no machine is activated here");
    const { credentials, lease } = await this.forgettingIfReleased(() => this.routes.renew(current));
    await this.storeToken(credentials);
    if (lease !== null) await this.acceptLease(lease);
  }

  /** The license's key, to show for the user's next computer. */
  licenseKey(): Promise<string> {
    return this.forgettingIfReleased(async () => {
      const auth = await this.authorization();
      return this.routes.licenseKey(this.licenseId, auth);
    });
  }

  private async authorization(key?: string): Promise<string> {
    if (key !== undefined) return licenseAuth(normalizeLicenseKey(key));
    if (this.machine === undefined) return bearer(typeof this.token === "function" ? await this.token() : (this.token as string));
    await this.machine.load();
    const credentials = this.machine.credentials;
    if (credentials === null) throw new NotActivatedError("no machine is activated here: activate(key) first, or give { key }");
    return bearer(credentials.token);
  }

  private async forgettingIfReleased<T>(work: () => Promise<T>): Promise<T> {
    try {
      return await work();
    } catch (error) {
      if (error instanceof MachineReleasedError) await this.forgetOwn();
      throw error;
    }
  }

  private async storeToken(renewed: Credentials): Promise<void> {
    const current = this.machine?.credentials;
    if (current && current.licenseId === renewed.licenseId && current.machineId === renewed.machineId) await this.machine?.store(renewed);
  }

  /**
   * This machine was released: its activation, its lease and the cached one go (the watermark
   * stays); the app is locked and asks for the key again.
   */
  private forgetMachine(): Promise<void> {
    if (this.machine === undefined) return Promise.resolve();
    const holder = this.currentHolder();
    this.holder = undefined;
    this.state = null;
    this.lastEventId = null;
    const done = Promise.all([holder ? this.serially(() => holder.forget()) : undefined, this.machine.forget()]);
    this.checkEntitlement();
    return done.then(() => undefined);
  }

  /** Released by this app's own request (or found released by one): a started client waits for a key. */
  private async forgetOwn(): Promise<void> {
    await this.forgetMachine();
    if (!this.running) return;
    this.closeSource();
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.setStatus("inactive");
  }

  /** Another activation while started: follow it at once. */
  private reconnectNow(): void {
    this.closeSource();
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.failures = 0;
    this.armExpiry();
    this.connect();
  }

  stop(): void {
    this.running = false;
    if (this.expiryTimer !== null) clearTimeout(this.expiryTimer);
    this.expiryTimer = null;
    this.closeSource();
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.setStatus("stopped");
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<LicenseState, void, undefined> {
    const queue: LicenseState[] = [];
    let wake: (() => void) | null = null;
    const onState = (state: LicenseState): void => {
      queue.push(state);
      wake?.();
    };
    const onStatus = (): void => wake?.();
    this.on("state", onState);
    this.on("status", onStatus);
    const startedHere = !this.running;
    this.start();
    try {
      for (;;) {
        while (queue.length > 0) yield queue.shift() as LicenseState;
        if (this.unauthorized !== null) throw this.unauthorized;
        if (!this.running) return;
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = null;
      }
    } finally {
      this.off("state", onState);
      this.off("status", onStatus);
      if (startedHere) this.stop();
    }
  }

  private setStatus(status: ClientStatus): void {
    if (status === this.status) return;
    this.status = status;
    this.emit("status", status);
  }

  private connect(): void {
    this.reconnectTimer = null;
    if (!this.running) return;
    if (this.machine !== undefined && this.machine.credentials === null) {
      this.setStatus("inactive"); // until activate()
      return;
    }
    this.setStatus(this.connections === 0 ? "connecting" : "reconnecting");
    this.openedAt = Date.now();
    const source = new EventSource(this.url, { fetch: (input, init) => this.fetchStream(input, init) });
    this.source = source;
    source.addEventListener("open", () => {
      this.connections += 1;
      this.setStatus("live");
    });
    source.addEventListener("message", (message) => {
      if (source !== this.source) return;
      this.failures = 0;
      if (message.lastEventId) this.lastEventId = Number(message.lastEventId);
      const state = JSON.parse(message.data) as LicenseState;
      this.state = state;
      if (!this.pinned) this.checkEntitlement();
      this.emit("state", state);
    });
    // No id: the lease leaves Last-Event-ID alone. It follows the state it signs.
    source.addEventListener("lease", (message) => {
      if (source !== this.source) return;
      const { lease } = JSON.parse(message.data) as { lease: string };
      void this.acceptLease(lease);
    });
    // The machine token renewed by the stream (no id either): kept in place of the old one.
    source.addEventListener("token", (message) => {
      if (source !== this.source) return;
      const data = JSON.parse(message.data) as { token?: unknown; machine_id?: unknown };
      const credentials = this.machine?.credentials;
      if (credentials && typeof data.token === "string" && data.machine_id === credentials.machineId) {
        void this.storeToken({ ...credentials, token: data.token });
      }
    });
    source.addEventListener("error", (error) => {
      if (source !== this.source) return;
      // Reconnecting is ours (the library's own waits the bare retry: each time, without
      // backoff or jitter): close it and open a new one with the resume point in a header.
      this.closeSource();
      if (error.code === 401 || error.code === 403) {
        // MachineReleasedError when this machine was released: forgotten, locked, ask for the key.
        const refusal = this.refusal instanceof UnauthorizedError ? this.refusal : new UnauthorizedError(error.code);
        this.running = false;
        if (refusal instanceof MachineReleasedError) void this.forgetMachine();
        this.unauthorized = refusal;
        this.setStatus("unauthorized");
        return;
      }
      if (!this.running) return;
      // A connection that stayed up a while was healthy: its end starts the backoff afresh.
      this.failures = Date.now() - this.openedAt > this.options.maxBackoffMs ? 1 : this.failures + 1;
      this.setStatus("reconnecting");
      this.reconnectTimer = setTimeout(() => this.connect(), this.reconnectDelay(this.failures));
    });
  }

  private closeSource(): void {
    if (this.watchdog !== null) clearTimeout(this.watchdog);
    this.watchdog = null;
    this.source?.close();
    this.source = null;
  }

  /** The token for a connection: the subscriber token, or the machine token (renewed first once half spent). */
  private async streamToken(): Promise<string> {
    if (this.machine === undefined) return typeof this.token === "function" ? await this.token() : (this.token as string);
    if (this.machine.tokenWantsRenewal()) {
      try {
        await this.renewToken();
      } catch (error) {
        // Not renewed now (the broker busy, say): the token still works, and the stream renews it.
        if (error instanceof MachineReleasedError || !(error instanceof BrokerError)) throw error;
      }
    }
    const credentials = this.machine.credentials;
    if (credentials === null) throw new NotActivatedError("no machine is activated here");
    return credentials.token;
  }

  /** eventsource's fetch: the token and the resume point in headers, and a body that is watched. */
  private async fetchStream(input: string | URL, init: RequestInit = {}): Promise<Response> {
    this.refusal = null;
    let token: string;
    try {
      token = await this.streamToken();
    } catch (error) {
      if (!(error instanceof UnauthorizedError)) throw error;
      // Found released while renewing: answered as the stream would have (eventsource sees a 401).
      this.refusal = error;
      return new Response(JSON.stringify(error.body), { status: error.status });
    }
    const headers = new Headers(init.headers);
    headers.set("authorization", `Bearer ${token}`);
    if (this.lastEventId !== null) headers.set("last-event-id", String(this.lastEventId));
    const response = await this.fetchImpl(input, { ...init, headers });
    if (response.status === 401 || response.status === 403) {
      // Why: "machine released" or another refusal (eventsource reports the status only).
      const text = await response.text();
      let body: unknown = null;
      try {
        body = JSON.parse(text);
      } catch {
        body = null;
      }
      this.refusal = errorOf(response.status, body, response.headers);
      return new Response(text, { status: response.status, statusText: response.statusText, headers: response.headers });
    }
    // Closed while the request was in flight: no watchdog for a stream nobody reads.
    if (!response.ok || response.body === null || init.signal?.aborted) return response;
    return new Response(response.body.pipeThrough(this.watch()), {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  }

  /**
   * Passes the body through unchanged, noting the `retry:` hint (eventsource keeps it to itself)
   * and failing the stream after readTimeoutMs without a byte: heartbeats arrive every 15 s, so
   * silence means a dead connection that TCP alone may take many minutes to notice.
   */
  private watch(): TransformStream<Uint8Array, Uint8Array> {
    const decoder = new TextDecoder();
    let partial = "";
    let stream: TransformStreamDefaultController<Uint8Array> | null = null;
    const arm = (): void => {
      if (this.watchdog !== null) clearTimeout(this.watchdog);
      this.watchdog = setTimeout(
        () => stream?.error(new Error(`no data for ${this.options.readTimeoutMs} ms`)),
        this.options.readTimeoutMs,
      );
    };
    return new TransformStream<Uint8Array, Uint8Array>({
      start: (controller) => {
        stream = controller;
        arm();
      },
      transform: (chunk, controller) => {
        arm();
        const lines = (partial + decoder.decode(chunk, { stream: true })).split(/\r\n|\r|\n/);
        partial = lines.pop() ?? "";
        for (const line of lines) {
          const hint = /^retry:\s?(\d+)$/.exec(line);
          if (hint) this.retryMs = Number(hint[1]);
        }
        controller.enqueue(chunk);
      },
      flush: () => {
        if (this.watchdog !== null) clearTimeout(this.watchdog);
        this.watchdog = null;
      },
    });
  }
}
