// The license side of the main process: one LicenseClient for the whole app, and a snapshot of
// what the windows need, sent to them on every change. No Electron here (`send` is injected), so
// the repository's tests run this very file against a live broker (tests/test_node_client.py).
import { LeaseVerifier, LicenseClient } from "license-broker-client";

// setTimeout's limit (~24.8 days): a longer lease is simply re-checked then.
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * @param {object} options
 * @param {string} options.baseUrl     the broker, e.g. "https://licenses.example.com"
 * @param {string} options.licenseId
 * @param {() => Promise<string>} options.getToken  asks your web app for a subscriber token
 * @param {string[]} options.publicKeys  the broker's lease keys, pinned in the app (PEM)
 * @param {string} options.cachePath     where the last lease is kept (under app.getPath("userData"))
 * @param {(channel: string, snapshot: object) => void} options.send  to every window
 */
export async function startLicense({ baseUrl, licenseId, getToken, publicKeys, cachePath, send }) {
  const client = new LicenseClient({
    baseUrl,
    licenseId,
    token: getToken,
    // Pinned keys verify offline; the JWKS follows a key rotation while online.
    verifier: LeaseVerifier.forServer(baseUrl, { publicKeys }),
    cache: cachePath,
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

  // A lease also ends on its own (offline for longer than the grace): look again when it expires.
  let expiry = null;
  const watchExpiry = () => {
    clearTimeout(expiry);
    if (client.lease === null) return;
    const ms = client.lease.expiresAt * 1000 - Date.now() + 1000;
    expiry = setTimeout(() => (publish(), watchExpiry()), Math.min(Math.max(ms, 0), MAX_TIMER_MS));
  };

  const onLease = () => (publish(), watchExpiry());
  await client.restore(); // the cached lease: the right answer at once, online or not
  client.on("lease", onLease);
  client.on("status", publish);
  watchExpiry();
  client.start();
  return {
    client,
    snapshot,
    stop() {
      // Listeners first: a lease still being verified must not re-arm the timer after this.
      client.off("lease", onLease);
      client.off("status", publish);
      clearTimeout(expiry);
      client.stop();
    },
  };
}
