// The license side of the main process: one LicenseClient for the whole app, a snapshot of what
// the windows need (sent to them on every change), and the gate every paid feature goes through.
// No Electron here (`send` is injected), so the repository's tests run this very file against a
// live broker (tests/test_node_client.py).
import { LeaseVerifier, LicenseClient } from "license-broker-client";

/**
 * @param {object} options
 * @param {string} options.baseUrl     the broker, e.g. "https://licenses.example.com"
 * @param {string} options.licenseId
 * @param {() => Promise<string>} options.getToken  asks your web app for a subscriber token
 * @param {string[]} options.publicKeys  the broker's lease keys, pinned in the app (what `license-broker keys public` prints)
 * @param {string} options.cachePath     where the last lease is kept (under app.getPath("userData"))
 * @param {(channel: string, snapshot: object) => void} options.send  to every window
 */
export async function startLicense({ baseUrl, licenseId, getToken, publicKeys, cachePath, send }) {
  const client = new LicenseClient({
    baseUrl,
    licenseId,
    token: getToken,
    // Only the pinned keys verify: a lease signed by anything else (a fake server's key) is refused.
    verifier: new LeaseVerifier({ publicKeys }),
    cache: cachePath, // the last lease, and its watermark beside it
  });

  // What a window shows. `entitled` comes from the signed lease only, never from the unsigned state.
  const snapshot = () => ({
    entitled: client.isEntitled(),
    status: client.lease?.status ?? "unknown",
    features: client.lease?.features ?? [],
    expiresAt: client.lease ? new Date(client.lease.expiresAt * 1000).toISOString() : null,
    connection: client.status,
  });
  const publish = () => send("license:changed", snapshot());

  await client.restore(); // the cached lease: the right answer at once, online or not
  // "entitlement": a lease unlocked or locked the app, or the last one ran out (the client's own
  // timer, for an app left offline that long). "lease": a renewal moves the offline deadline.
  client.on("entitlement", publish);
  client.on("lease", publish);
  client.on("status", publish);
  client.start();
  return {
    client,
    snapshot,
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
