import { EventEmitter } from "node:events";
import { EventSource } from "eventsource";
import { LeaseCache } from "./cache.js";
import { LeaseHolder } from "./holder.js";
import { InvalidLeaseError, type Lease, type LeaseVerifier } from "./leases.js";
import { Watermark } from "./watermark.js";

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

export type ClientStatus = "connecting" | "live" | "reconnecting" | "unauthorized" | "stopped";
/** "pinned": leases verified with pinned keys; "unverified": no verifier, the live state only. */
export type ClientTrust = "pinned" | "unverified";

/** The expiry timer wakes at least this often: a machine that slept, or a moved clock, is noticed. */
const EXPIRY_CHECK_MS = 60_000;

/** 401/403: a new token is needed; reconnecting with this one would never succeed. */
export class UnauthorizedError extends Error {
  override name = "UnauthorizedError";
  constructor(readonly status: number) {
    super(`the broker answered ${status}: the token is invalid, expired, or for another license`);
  }
}

export interface LicenseClientOptions {
  /** The broker, e.g. "https://licenses.example.com". */
  baseUrl: string;
  licenseId: string;
  /** A subscriber token, or a function asked for one on every connection (so expired ones are replaced). */
  token: string | (() => string | Promise<string>);
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
  readonly url: string;
  readonly licenseId: string;
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
  private readonly holder: LeaseHolder | undefined;
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
    this.licenseId = options.licenseId;
    this.url = `${options.baseUrl.replace(/\/+$/, "")}/api/licenses/${encodeURIComponent(options.licenseId)}/events`;
    this.token = options.token;
    this.verifier = options.verifier;
    this.cache = typeof options.cache === "string" ? new LeaseCache(options.cache) : options.cache;
    const watermark = options.watermark ?? (this.cache ? `${this.cache.path}.watermark` : undefined);
    this.watermark = typeof watermark === "string" ? new Watermark(watermark) : watermark;
    // Without a pinned key (no verifier, or one given no key) leases prove nothing: the client
    // follows the live state only, and says so.
    const pinned = this.verifier !== undefined && this.verifier.kids.size > 0;
    this.trust = pinned ? "pinned" : "unverified";
    this.holder = pinned && this.verifier ? new LeaseHolder(this.licenseId, this.verifier, this.cache, this.watermark, (m) => this.emitWarning(m)) : undefined;
    if (this.holder === undefined) {
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
    this.fetchImpl = options.fetch ?? globalThis.fetch;
  }

  /** The newest valid lease: received on the stream, or restored from the cache. */
  get lease(): Lease | null {
    return this.holder?.lease ?? null;
  }

  /**
   * Whether the app may unlock now. With a pinned key: only on a valid, unexpired lease for this
   * license, online or off (await restore() first at start-up), with a clock that was not turned
   * back. Without one: the last state received, unsigned, online only.
   */
  isEntitled(): boolean {
    if (this.holder === undefined) return this.state?.entitled === true;
    return this.holder.isEntitled();
  }

  /** Read the watermark and the cached lease, verified with the pinned keys (no network). Once; start() calls it too. */
  async restore(): Promise<Lease | null> {
    if (this.holder === undefined) return null;
    const lease = await this.holder.restore();
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
    if (this.holder === undefined) return null;
    let lease: Lease | null;
    try {
      lease = await this.holder.accept(token);
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
    if (!this.running || this.holder === undefined) return;
    const left = this.holder.msLeft();
    const delay = left === null ? EXPIRY_CHECK_MS : Math.min(Math.max(left, 0) + 50, EXPIRY_CHECK_MS);
    this.expiryTimer = setTimeout(() => {
      this.expiryTimer = null;
      void this.serially(async () => {
        await this.holder?.tick();
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
      if (this.holder === undefined) this.checkEntitlement();
      this.emit("state", state);
    });
    // No id: the lease leaves Last-Event-ID alone. It follows the state it signs.
    source.addEventListener("lease", (message) => {
      if (source !== this.source) return;
      const { lease } = JSON.parse(message.data) as { lease: string };
      void this.acceptLease(lease);
    });
    source.addEventListener("error", (error) => {
      if (source !== this.source) return;
      // Reconnecting is ours (the library's own waits the bare retry: each time, without
      // backoff or jitter): close it and open a new one with the resume point in a header.
      this.closeSource();
      if (error.code === 401 || error.code === 403) {
        this.unauthorized = new UnauthorizedError(error.code);
        this.running = false;
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

  /** eventsource's fetch: the token and the resume point in headers, and a body that is watched. */
  private async fetchStream(input: string | URL, init: RequestInit = {}): Promise<Response> {
    const token = typeof this.token === "function" ? await this.token() : this.token;
    const headers = new Headers(init.headers);
    headers.set("authorization", `Bearer ${token}`);
    if (this.lastEventId !== null) headers.set("last-event-id", String(this.lastEventId));
    const response = await this.fetchImpl(input, { ...init, headers });
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
