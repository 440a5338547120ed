// The license side of the main process: one LicenseClient for the whole app, activated with the
// license key the buyer types, a snapshot of what the windows need (sent to them on every change),
// and the gate every paid feature goes through. No Electron here (`send` is injected), so the
// repository's tests run this very file against a live broker (tests/test_node_client.py).
import { LeaseVerifier, LicenseClient, MachineReleasedError } from "license-broker-client";

/**
 * What a refusal tells the window: plain data (errors lose their class over IPC), with the
 * machines to release from when the key's limit is reached.
 */
function refusal(error) {
  const answer = { ok: false, error: error.code ?? "error", message: error.message };
  if (error.code === "machine_limit_reached") {
    answer.max = error.max;
    answer.machines = error.machines.map(({ id, name, platform, lastSeenAt }) => ({ id, name, platform, lastSeenAt }));
  }
  if (error.code === "rate_limited") answer.retryAfter = error.retryAfter;
  return answer;
}

/**
 * @param {object} options
 * @param {string} options.baseUrl     the broker, e.g. "https://licenses.example.com"
 * @param {string} options.appId       your app's own salt for the machine fingerprint
 * @param {string[]} options.publicKeys  the broker's lease keys, pinned in the app (what `license-broker keys public` prints)
 * @param {string} options.cachePath     where the last lease is kept (under app.getPath("userData")); the
 *                                        activation and the watermark go beside it
 * @param {(channel: string, snapshot: object) => void} options.send  to every window
 * @param {string} [options.machineId]   replaces the OS machine id (tests; a system the client does not know)
 */
export async function startLicense({ baseUrl, appId, publicKeys, cachePath, send, machineId }) {
  const client = new LicenseClient({
    baseUrl,
    appId,
    machineId,
    // Only the pinned keys verify: a lease signed by anything else (a fake server's key), or issued
    // to another computer, is refused.
    verifier: new LeaseVerifier({ publicKeys }),
    cache: cachePath, // the last lease; its watermark and this machine's activation beside it
  });

  // What a window shows. `entitled` comes from the signed lease only, never from the unsigned state.
  const snapshot = () => ({
    screen: client.activated ? "app" : "key", // no machine activated here: "Enter your license key"
    released: client.unauthorized instanceof MachineReleasedError, // deactivated from another computer
    entitled: client.isEntitled(),
    status: client.lease?.status ?? "unknown",
    features: client.lease?.features ?? [],
    expiresAt: client.lease ? new Date(client.lease.expiresAt * 1000).toISOString() : null,
    connection: client.status,
  });
  const publish = () => send("license:changed", snapshot());

  await client.restore(); // the activation and the cached lease: the right answer at once, online or not
  // "entitlement": a lease unlocked or locked the app, or the last one ran out (the client's own
  // timer, for an app left offline that long). "lease": a renewal moves the offline deadline.
  // "status": live, reconnecting, "inactive" (waiting for a key), "unauthorized" (released).
  client.on("entitlement", publish);
  client.on("lease", publish);
  client.on("status", publish);
  client.start(); // without an activation it waits for one

  /** Activates this computer with `key`; unlocked at once if the license is paid. */
  async function activate(key) {
    try {
      await client.activate(key);
    } catch (error) {
      return refusal(error);
    }
    if (!["live", "connecting", "reconnecting"].includes(client.status)) client.start(); // after a release
    publish();
    return { ok: true };
  }

  return {
    client,
    snapshot,
    activate,
    /** "Limit reached": releases the machine the user picked (with the key: no token yet), then activates here. */
    async replace(machineId, key) {
      try {
        await client.release(machineId, { key });
      } catch (error) {
        if (error.code !== "no_such_machine") return refusal(error); // released already: the place is free
      }
      return activate(key);
    },
    /** This computer's place is freed for another; the app asks for a key again. */
    async deactivate() {
      try {
        await client.deactivate();
      } catch (error) {
        return refusal(error);
      }
      publish();
      return { ok: true };
    },
    /**
     * Runs a paid feature, here in the main process, only while a valid signed lease entitles the
     * app. A window's CSS and scripts are the user's to change; this decision is not.
     * @template T
     * @param {string} feature
     * @param {() => T} work
     * @returns {{ ok: true, result: T } | { ok: false, reason: string }}
     */
    run(feature, work) {
      if (!client.isEntitled()) return { ok: false, reason: "locked" };
      // Selling tiers (Stripe Entitlements)? Check client.lease.features.includes(feature) here too.
      return { ok: true, result: work() };
    },
    stop() {
      client.off("entitlement", publish);
      client.off("lease", publish);
      client.off("status", publish);
      client.stop();
    },
  };
}
