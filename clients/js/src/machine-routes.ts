import { BrokerError, BrokerUnavailableError, errorOf } from "./errors.js";
import { type Activation, type Credentials, machineOf, type MachineList } from "./machines.js";

/**
 * The broker's routes of keys and machines (docs/protocol.md), one method each: the request, and
 * its answer parsed or its refusal thrown as the error an app handles (errors.ts). No state here:
 * the client keeps the activation.
 */
export const TIMEOUT_MS = 15_000;

export const bearer = (token: string): string => `Bearer ${token}`;
export const licenseAuth = (key: string): string => `License ${key}`;

export type Json = Record<string, unknown>;

export class MachineRoutes {
  readonly baseUrl: string;

  constructor(
    baseUrl: string,
    private readonly fetchImpl: typeof fetch = globalThis.fetch,
  ) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
  }

  protected async answer(method: string, path: string, options: { auth?: string; body?: Json } = {}): Promise<[number, Json]> {
    const headers: Record<string, string> = { accept: "application/json" };
    if (options.auth !== undefined) headers.authorization = options.auth;
    if (options.body !== undefined) headers["content-type"] = "application/json";
    let response: Response;
    let data: unknown = null;
    try {
      response = await this.fetchImpl(this.baseUrl + path, {
        method,
        headers,
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
      const text = await response.text();
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    } catch (error) {
      throw new BrokerUnavailableError(`the broker did not answer: ${(error as Error).message}`);
    }
    if (response.status >= 300) throw errorOf(response.status, data, response.headers);
    if (typeof data !== "object" || data === null || Array.isArray(data)) {
      throw new BrokerError(`${response.status}: not a JSON object`, { status: response.status });
    }
    return [response.status, data as Json];
  }

  async activate(key: string, fingerprint: string, name: string | null, platform: string | null): Promise<{ activation: Activation; credentials: Credentials }> {
    const body: Json = { key, fingerprint };
    if (name !== null) body.name = name;
    if (platform !== null) body.platform = platform;
    const [status, data] = await this.answer("POST", "/api/activations", { body });
    const machine = data.machine as Json | undefined;
    const used = data.machines as Json | undefined;
    if (typeof data.license_id !== "string" || typeof data.token !== "string" || typeof machine?.id !== "string" || typeof used?.used !== "number") {
      throw new BrokerError("the activation's answer is not what docs/protocol.md says", { status });
    }
    const activation: Activation = {
      licenseId: data.license_id,
      machine: machineOf(machine),
      created: status === 201,
      used: used.used,
      max: typeof used.max === "number" ? used.max : null,
      lease: typeof data.lease === "string" ? data.lease : null,
    };
    return { activation, credentials: { licenseId: data.license_id, machineId: machine.id, token: data.token } };
  }

  async machines(auth: string): Promise<MachineList> {
    const [status, data] = await this.answer("GET", "/api/machines", { auth });
    if (typeof data.license_id !== "string" || !Array.isArray(data.machines) || typeof data.used !== "number") {
      throw new BrokerError("the machine list is not what docs/protocol.md says", { status });
    }
    return {
      licenseId: data.license_id,
      machines: (data.machines as Json[]).map(machineOf),
      used: data.used,
      max: typeof data.max === "number" ? data.max : null,
    };
  }

  async release(machineId: string, auth: string): Promise<void> {
    await this.answer("DELETE", `/api/machines/${encodeURIComponent(machineId)}`, { auth });
  }

  /** A fresh token for the machine (with its own token), and a lease bound to it. */
  async renew(credentials: Credentials): Promise<{ credentials: Credentials; lease: string | null }> {
    const path = `/api/machines/${encodeURIComponent(credentials.machineId)}/token`;
    const [status, data] = await this.answer("POST", path, { auth: bearer(credentials.token) });
    if (typeof data.token !== "string") throw new BrokerError("the renewal's answer holds no token", { status });
    return { credentials: { ...credentials, token: data.token }, lease: typeof data.lease === "string" ? data.lease : null };
  }

  async licenseKey(licenseId: string, auth: string): Promise<string> {
    const [status, data] = await this.answer("GET", `/api/licenses/${encodeURIComponent(licenseId)}/key`, { auth });
    if (typeof data.key !== "string") throw new BrokerError("the answer holds no key", { status });
    return data.key;
  }
}
