// The license side of the main process: one LicenseClient for the whole app, activated with the
// license key the buyer types, by a purchase made from the app (Buy: Stripe Checkout in the system
// browser) or by a trial, a snapshot of what the windows need (sent to them on every change), and
// the gate every paid feature goes through. No Electron here (`send` and `openUrl` are injected),
// so the repository's tests run this very file against a live broker (tests/test_node_client.py).
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

const DAY_MS = 86_400_000;

/**
 * @param {object} options
 * @param {string} options.baseUrl     the broker, e.g. "https://licenses.example.com"
 * @param {string} options.appId       your app's own salt for the machine fingerprint
 * @param {string[]} options.publicKeys  the broker's lease keys, pinned in the app (what `license-broker keys public` prints)
 * @param {string} options.cachePath     where the last lease is kept (under app.getPath("userData")); the
 *                                        activation and the watermark go beside it
 * @param {(channel: string, snapshot: object) => void} options.send  to every window
 * @param {(url: string) => Promise<void>} options.openUrl  opens a page in the system browser (Electron: shell.openExternal)
 * @param {string} [options.machineId]   replaces the OS machine id (tests; a system the client does not know)
 */
export async function startLicense({ baseUrl, appId, publicKeys, cachePath, send, openUrl, machineId }) {
  const client = new LicenseClient({
    baseUrl,
    appId,
    machineId,
    // Only the pinned keys verify: a lease signed by anything else (a fake server's key), or issued
    // to another computer, is refused.
    verifier: new LeaseVerifier({ publicKeys }),
    cache: cachePath, // the last lease; its watermark and this machine's activation beside it
  });

  // A checkout opened in the browser and not yet paid (one at a time: Buy again reopens it), and
  // what became of the last one ("checkout_expired"), for the window to say.
  let checkout = null;
  let notice = null;

  /** The running trial, from the signed lease (so offline too): when it ends and the days left. */
  const trialOf = (lease) => {
    if (!lease?.trialEnd) return null;
    const msLeft = lease.trialEnd * 1000 - Date.now();
    return { endsAt: new Date(lease.trialEnd * 1000).toISOString(), daysLeft: Math.max(0, Math.ceil(msLeft / DAY_MS)), ended: msLeft <= 0 };
  };

  // What a window shows. `entitled` comes from the signed lease only, never from the unsigned state.
  const snapshot = () => {
    const trial = trialOf(client.lease);
    return {
      // No machine activated here: the first screen ("Start a 14-day trial", "Buy", "I have a key").
      screen: client.activated ? "app" : "key",
      released: client.unauthorized instanceof MachineReleasedError, // deactivated from another computer
      entitled: client.isEntitled(),
      status: trial?.ended ? "expired" : (client.lease?.status ?? "unknown"),
      features: client.lease?.features ?? [],
      expiresAt: client.lease ? new Date(client.lease.expiresAt * 1000).toISOString() : null,
      connection: client.status,
      trial: trial?.ended ? null : trial,
      checkout: checkout && { expiresAt: new Date(checkout.expiresAt * 1000).toISOString() }, // "finish paying in your browser"
      notice,
      // Something bought (a Stripe customer): "Manage subscription" has something to show.
      manageable: typeof client.state?.state?.customer === "string",
    };
  };
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

  /**
   * Buy: a Stripe Checkout for this computer, opened in the system browser. The window unlocks by
   * itself when the payment's webhooks reach the broker (the stream's lease, bound to this
   * machine); a checkout left unpaid ends (`notice: "checkout_expired"`). From a trial, the same
   * license is bought. Returns at once, the page open.
   */
  async function buy(price) {
    if (checkout === null) {
      let purchase;
      try {
        purchase = await client.buy(price);
      } catch (error) {
        return refusal(error);
      }
      checkout = purchase;
      notice = null;
      purchase.completed.then(
        () => undefined,
        (error) => {
          notice = error.code ?? "error";
        },
      ).finally(() => {
        if (checkout === purchase) checkout = null;
        publish();
      });
      publish();
    }
    return opening(checkout.checkoutUrl); // Buy again while it is open: the same page
  }

  /** The system browser, or why not (no browser configured, say). */
  async function opening(url) {
    try {
      await openUrl(url);
    } catch (error) {
      return { ok: false, error: "no_browser", message: error.message, url };
    }
    return { ok: true };
  }

  return {
    client,
    snapshot,
    activate,
    buy,
    /** "Start a 14-day trial": unlocked at once, until the trial ends (then locked, online or not). */
    async startTrial() {
      try {
        await client.startTrial();
      } catch (error) {
        return refusal(error); // "trial_used": this computer had one; "not_offered": trials are off
      }
      if (!["live", "connecting", "reconnecting"].includes(client.status)) client.start();
      publish();
      return { ok: true };
    },
    /** "Manage subscription": Stripe's Billing Portal in the browser (cancel, a new card, invoices). */
    async manage() {
      let url;
      try {
        url = await client.portal();
      } catch (error) {
        return refusal(error); // "no_customer": nothing bought yet, offer Buy
      }
      return opening(url);
    },
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
