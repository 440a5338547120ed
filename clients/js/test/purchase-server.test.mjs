// license-broker-client buying, trying and managing from the app, against brokers that sell through
// the fake Stripe API (tests/test_node_client.py starts them and names them here):
//   BUY_URL           a broker with STRIPE_PRICES (PRICES), 14-day trials and the portal
//   SHORT_TRIAL_URL   the same broker, on the same database, whose trials last 5 s and whose unpaid
//                     checkouts are swept every 2 s (CHECKOUT_PENDING_TTL 16 s)
//   SHOP_URL          the fake Stripe API; its checkout page is paid by `POST <checkout_url>` (what a
//                     buyer's browser does: Stripe's signed webhooks go to the broker), and
//                     `POST /expire/<session>` expires a session unpaid, as Stripe does
//   LEASE_PUBLIC_KEY  the key the brokers' leases are signed with, as an app pins it
import assert from "node:assert/strict";
import { mkdtemp, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  AlreadyPaidError,
  BrokerError,
  CheckoutExpiredError,
  LeaseVerifier,
  LicenseClient,
  machineFingerprint,
  NoCustomerError,
  RateLimitedError,
  TrialUsedError,
} from "license-broker-client";
import { until } from "./helpers.mjs";

const { BUY_URL, SHORT_TRIAL_URL, SHOP_URL, LEASE_PUBLIC_KEY } = process.env;
const skip = BUY_URL ? false : "BUY_URL is not set (tests/test_node_client.py runs these)";
const [MONTHLY, LIFETIME] = (process.env.PRICES ?? ",").split(",");
const APP = "com.example.draw";

const tmp = () => mkdtemp(join(tmpdir(), "lb-buy-"));
const osId = (name) => `os-id-${name}-${Math.random().toString(36).slice(2)}`;
const machineFile = async (dir) => JSON.parse(await readFile(join(dir, "lease.machine"), "utf8"));

function appOn(baseUrl, dir, machineId, options = {}) {
  return new LicenseClient({ baseUrl, appId: APP, machineId, verifier: new LeaseVerifier({ publicKeys: [LEASE_PUBLIC_KEY] }),
    cache: join(dir, "lease"), minBackoffMs: 50, maxBackoffMs: 500, ...options });
}

/** What the buyer's browser does at the checkout page: pay (`expire`: let it run out unpaid). */
async function inTheBrowser(checkoutUrl, action = "pay") {
  const url = action === "pay" ? checkoutUrl : `${SHOP_URL}/expire/${checkoutUrl.split("/").at(-1)}`;
  const response = await fetch(url, { method: "POST" });
  assert.equal(response.status, 200, await response.clone().text());
  return (await response.json()).events;
}

/** Whether `promise` has settled yet (without waiting for it). */
async function settled(promise) {
  const pending = Symbol("pending");
  return (await Promise.race([promise.then(() => true, () => true), new Promise((resolve) => setImmediate(() => resolve(pending)))])) !== pending;
}

test("a full buy: the checkout URL at once, paid in the browser, completed on a lease bound to this machine", { skip }, async (t) => {
  const dir = await tmp();
  const id = osId("buyer");
  const app = appOn(BUY_URL, dir, id);
  const entitlements = [];
  app.on("entitlement", (entitled) => entitlements.push(entitled));
  app.start();
  try {
    await until(() => app.status === "inactive", "waiting for a key, or a purchase");
    const purchase = await app.buy();
    assert.ok(purchase.checkoutUrl.startsWith(`${SHOP_URL}/pay/cs_test_`), purchase.checkoutUrl);
    assert.ok(purchase.expiresAt > Date.now() / 1000 + 3600, String(purchase.expiresAt));
    // Kept as an activation is: the license and this machine, its token beside the cache.
    assert.deepEqual([app.activated, app.licenseId, app.machineId], [true, purchase.licenseId, purchase.machineId]);
    assert.deepEqual(await machineFile(dir), { license_id: purchase.licenseId, machine_id: purchase.machineId, token: (await machineFile(dir)).token });
    await until(() => app.status === "live" && app.state?.license_id === purchase.licenseId, "following the pending license");
    assert.deepEqual([app.state.status, app.state.entitled, app.isEntitled()], ["none", false, false]);
    assert.equal(await settled(purchase.completed), false);

    const paidAt = Date.now();
    assert.deepEqual(await inTheBrowser(purchase.checkoutUrl), ["customer.subscription.created", "invoice.paid", "checkout.session.completed"]);
    const lease = await purchase.completed;
    t.diagnostic(`payment webhooks to completed: ${Date.now() - paidAt} ms`);
    assert.deepEqual([lease.licenseId, lease.entitled, lease.status, lease.machineId, lease.trialEnd], [purchase.licenseId, true, "active", purchase.machineId, null]);
    assert.equal(lease.fingerprint, await machineFingerprint(APP, { machineId: id }));
    assert.deepEqual([app.isEntitled(), app.lease, entitlements], [true, lease, [true]]);
    assert.match(await app.licenseKey(), /^[0-9A-Z]{5}(-[0-9A-Z]{5}){4}$/); // for the next computer

    await assert.rejects(app.buy(), AlreadyPaidError); // paid: manage it instead
    const portal = await app.portal();
    assert.ok(portal.startsWith(`${SHOP_URL}/portal/session/bps_`), portal);
  } finally {
    app.stop();
  }
  // A restart with no network: the purchase's activation and lease unlock at once.
  const offline = appOn("http://127.0.0.1:9", dir, id);
  await offline.restore();
  assert.deepEqual([offline.activated, offline.isEntitled()], [true, true]);
});

test("an unpaid checkout that expires rejects completed, and the client waits for a key or a buy again", { skip }, async (t) => {
  const dir = await tmp();
  const app = appOn(SHORT_TRIAL_URL, dir, osId("expires"));
  app.start();
  try {
    await until(() => app.status === "inactive", "waiting for a key");
    const purchase = await app.buy(LIFETIME);
    await until(() => app.status === "live" && app.state?.license_id === purchase.licenseId, "following the pending license");
    const expiredAt = Date.now();
    await inTheBrowser(purchase.checkoutUrl, "expire");
    const expired = await purchase.completed.catch((error) => error);
    assert.ok(expired instanceof CheckoutExpiredError, String(expired));
    t.diagnostic(`expired webhook to completed rejected: ${Date.now() - expiredAt} ms`);
    assert.deepEqual([expired.code, expired.expiresAt], ["checkout_expired", purchase.expiresAt]);
    // The broker removed the pending license and its machine: nothing held, back to the first screen.
    assert.deepEqual([app.activated, app.isEntitled(), app.unauthorized, app.status], [false, false, null, "inactive"]);
    await until(async () => (await readFile(join(dir, "lease.machine")).catch(() => null)) === null, "the activation forgotten");
    const again = await app.buy();
    assert.notEqual(again.licenseId, purchase.licenseId);
    await until(() => app.status === "live" && app.state?.license_id === again.licenseId, "following the new checkout");
    await inTheBrowser(again.checkoutUrl);
    assert.equal((await again.completed).licenseId, again.licenseId);
  } finally {
    app.stop();
  }
});

test("a trial: entitled at once until trial_end, once per machine ever, no portal; buying from it keeps the license", { skip }, async () => {
  const id = osId("trial");
  const app = appOn(BUY_URL, await tmp(), id);
  const trial = await app.startTrial({ name: "Work laptop" });
  const days = (trial.trialEnd - Date.now() / 1000) / 86400;
  assert.ok(days > 13.99 && days <= 14, String(days));
  assert.deepEqual([app.activated, app.isEntitled(), app.licenseId, app.machineId], [true, true, trial.licenseId, trial.machineId]);
  assert.deepEqual([trial.lease.status, trial.lease.trialEnd, trial.lease.machineId], ["trialing", trial.trialEnd, trial.machineId]);
  assert.ok(trial.lease.expiresAt <= trial.trialEnd);
  // The same computer after a reinstall (nothing kept): its fingerprint had its trial.
  const reinstalled = appOn(BUY_URL, await tmp(), id);
  const refused = await reinstalled.startTrial().catch((error) => error);
  assert.ok(refused instanceof TrialUsedError, String(refused));
  assert.deepEqual([refused.code, refused.status, reinstalled.activated], ["trial_used", 409, false]);
  await assert.rejects(app.portal(), NoCustomerError); // nothing bought yet: offer Buy

  app.start();
  try {
    await until(() => app.status === "live" && app.state?.status === "trialing", "the trial's stream");
    const purchase = await app.buy(LIFETIME);
    assert.deepEqual([purchase.licenseId, purchase.machineId], [trial.licenseId, trial.machineId]);
    // Entitled already (the trial), but not by this purchase: completed waits for the payment.
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.deepEqual([await settled(purchase.completed), app.isEntitled()], [false, true]);
    await inTheBrowser(purchase.checkoutUrl);
    const lease = await purchase.completed;
    assert.deepEqual([lease.status, lease.trialEnd, lease.licenseId, lease.machineId], ["paid", null, trial.licenseId, trial.machineId]);
    assert.ok((await app.portal()).startsWith(`${SHOP_URL}/portal/session/`));
  } finally {
    app.stop();
  }
});

test("a trial ends on time: the stream locks the app at trial_end, and offline its lease expires then", { skip }, async (t) => {
  const dir = await tmp();
  const id = osId("short");
  const app = appOn(SHORT_TRIAL_URL, dir, id);
  const states = [];
  app.on("state", (state) => states.push(state));
  const trial = await app.startTrial();
  const offline = appOn("http://127.0.0.1:9", dir, id); // the same app, restarted with no network
  await offline.restore();
  assert.deepEqual([app.isEntitled(), offline.isEntitled()], [true, true]);
  const locked = new Promise((resolve) => app.on("entitlement", (entitled) => entitled || resolve(Date.now())));
  app.start();
  try {
    const lockedAt = await locked;
    const late = lockedAt - trial.trialEnd * 1000;
    t.diagnostic(`locked ${late} ms after trial_end`);
    assert.ok(late >= -1000 && late < 3000, `${late} ms`);
    await until(() => states.at(-1)?.status === "expired", "the trial's end on the stream");
    assert.deepEqual([states.at(-1).entitled, states.at(-1).stripe_event_type], [false, "trial.ended"]);
  } finally {
    app.stop();
  }
  await until(() => !offline.isEntitled(), "the offline lease expired", 2_000);
  assert.ok(Date.now() >= trial.trialEnd * 1000 - 1000);
});

test("429: Retry-After is carried, and respected: the next call waits it out without sending", { skip }, async () => {
  const address = `10.${[0, 0, 0].map(() => Math.floor(Math.random() * 250) + 1).join(".")}`;
  const sent = [];
  const fromElsewhere = (input, init = {}) => {
    sent.push(String(input));
    const headers = new Headers(init.headers);
    headers.set("x-forwarded-for", address);
    return fetch(input, { ...init, headers });
  };
  const app = appOn(BUY_URL, await tmp(), osId("many"), { fetch: fromElsewhere });
  const codes = [];
  for (let i = 0; i < 11; i++) codes.push(await app.startTrial().then(() => "started", (error) => error.code));
  assert.deepEqual(codes, ["started", ...Array(9).fill("trial_used"), "rate_limited"]);
  const limited = await app.startTrial().catch((error) => error);
  assert.ok(limited instanceof RateLimitedError && limited.retryAfter > 0 && limited.retryAfter <= 3600, String(limited.retryAfter));
  assert.equal(sent.length, 11); // the twelfth was not sent
});

test("a price the broker does not sell is refused with nothing kept", { skip }, async () => {
  const dir = await tmp();
  const app = appOn(BUY_URL, dir, osId("price"));
  const refused = await app.buy("price_not_sold").catch((error) => error);
  assert.ok(refused instanceof BrokerError, String(refused));
  assert.deepEqual([refused.status, refused.body.error], [400, `price: one of ${MONTHLY}, ${LIFETIME}`]);
  assert.deepEqual([app.activated, app.status], [false, "stopped"]);
  await assert.rejects(readFile(join(dir, "lease.machine")), { code: "ENOENT" });
});
