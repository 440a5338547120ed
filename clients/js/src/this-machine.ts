import { hostname } from "node:os";
import { machineFingerprint } from "./fingerprint.js";
import type { MachineBinding } from "./leases.js";
import { normalizeLicenseKey } from "./license-key.js";
import type { MachineRoutes } from "./machine-routes.js";
import { type Activation, type Credentials, type MachineFile, tokenTimes } from "./machines.js";

/** The computer's name, as the machine lists show it ("deactivate my old laptop"). */
export function defaultName(): string | null {
  try {
    // Printable characters only, as the broker takes them (no control, format or separator but space).
    const name = [...hostname()].filter((c) => c === " " || !/[\p{C}\p{Z}]/u.test(c)).slice(0, 200).join("");
    return name || null;
  } catch {
    return null;
  }
}

/**
 * This machine's side of a license activated with a key: its fingerprint (computed, never stored),
 * its activation (kept in `<cache>.machine`, 0600) and when its token wants renewing. The client
 * holds one when it is created with `appId`; no network here but through MachineRoutes.
 */
export class ThisMachine {
  private current: Credentials | null = null;
  private computed: string | null = null;
  private loading: Promise<void> | undefined;

  constructor(
    readonly appId: string,
    readonly routes: MachineRoutes,
    readonly file: MachineFile | undefined,
    private readonly osMachineId: string | undefined,
    private readonly log: (message: string) => void,
  ) {
    if (!appId) throw new TypeError("appId: your app's own salt for the machine fingerprint (e.g. \"com.example.draw\")");
  }

  get credentials(): Credentials | null {
    return this.current;
  }

  /** null until load() (or activate()) computed it. */
  get fingerprint(): string | null {
    return this.computed;
  }

  /** Reads the activation and computes the fingerprint, once; MachineIdError if the OS id is unreadable. */
  load(): Promise<void> {
    this.loading ??= (async () => {
      const stored = this.file ? await this.file.load() : null;
      this.current ??= stored;
    })();
    return this.loading;
  }

  async computeFingerprint(): Promise<string> {
    this.computed ??= await machineFingerprint(this.appId, { machineId: this.osMachineId });
    return this.computed;
  }

  binding(): MachineBinding | null {
    return this.current === null || this.computed === null ? null : { machineId: this.current.machineId, fingerprint: this.computed };
  }

  async store(credentials: Credentials): Promise<void> {
    this.current = credentials;
    try {
      await this.file?.save(credentials);
    } catch (error) {
      this.log(`activation not written to ${this.file?.path}: ${(error as Error).message}`); // it holds for this run
    }
  }

  async forget(): Promise<void> {
    this.current = null;
    try {
      await this.file?.clear();
    } catch (error) {
      this.log(`activation not removed from ${this.file?.path}: ${(error as Error).message}`);
    }
  }

  /** MalformedLicenseKeyError before anything is sent; the broker's refusals as errors. */
  async activate(key: string, name: string | null | undefined, platform: string | null | undefined): Promise<{ activation: Activation; credentials: Credentials }> {
    const display = normalizeLicenseKey(key);
    const fingerprint = await this.computeFingerprint();
    return this.routes.activate(display, fingerprint, name === undefined ? defaultName() : name, platform ?? process.platform);
  }

  /**
   * More than half of the machine token's life is spent (the broker's stream renews it at the same
   * point; this is for a client that connects, or reconnects, after it).
   */
  tokenWantsRenewal(nowMs: number = Date.now()): boolean {
    const times = this.current ? tokenTimes(this.current.token) : null;
    if (times === null) return false;
    const [issued, expires] = times;
    return nowMs / 1000 >= issued + (expires - issued) / 2;
  }
}
