// The example's main-process code (license.js) against a live broker: tests/test_node_client.py
// runs it, with BROKER_URL (development mode, license keys on, one machine per license, signing
// with the key LEASE_PUBLIC_KEY_A verifies). Each "computer" is an OS machine id of its own.
// Buy, trials and the portal against brokers that sell through the fake Stripe API: BUY_URL
// (14-day trials), SHORT_TRIAL_URL (5 s trials), their leases signed with LEASE_PUBLIC_KEY; the
// "system browser" pays a checkout page with `POST <checkout_url>` (SHOP_URL: the fake Stripe,
// which sends the broker Stripe's signed webhooks).
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { startLicense } from "./license.js";

const { BROKER_URL, LEASE_PUBLIC_KEY_A, BUY_URL, SHORT_TRIAL_URL, SHOP_URL, LEASE_PUBLIC_KEY } = process.env;
const skip = BROKER_URL ? false : "BROKER_URL is not set (tests/test_node_client.py runs these)";
const skipSelling = BUY_URL ? false : "BUY_URL is not set (tests/test_node_client.py runs these)";
const APP_ID = "com.example.license-broker-demo";

async function post(path, body) {
  const response = await fetch(`${BROKER_URL}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  assert.equal(response.status, 200, await response.clone().text());
  return response.json();
}

/** Pays for a new license as Stripe would tell the broker; its key, as the /activate page shows it. */
async function buy() {
  const licenseId = `lic_electron_${Math.random().toString(36).slice(2, 12)}`;
  const { events } = await post("/dev/simulate", { license_id: licenseId, action: "pay" });
  const session = events.find((event) => event.type === "checkout.session.completed").object;
  const shown = await (await fetch(`${BROKER_URL}/api/checkout-sessions/${session}/license`)).json();
  assert.equal(shown.license_id, licenseId);
  return { licenseId, key: shown.key };
}

async function until(predicate, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The app on one computer: its own user-data directory and OS machine id. */
async function computer(name, options = {}) {
  const sent = [];
  const license = await startLicense({
    baseUrl: BROKER_URL,
    appId: APP_ID,
    publicKeys: [LEASE_PUBLIC_KEY_A],
    cachePath: join(await mkdtemp(join(tmpdir(), `lb-electron-${name}-`)), "license-lease"),
    machineId: `os-id-${name}-${Math.random()}`,
    send: (channel, snapshot) => sent.push([channel, snapshot]),
    ...options,
  });
  return { license, sent, last: () => sent.at(-1)?.[1] ?? license.snapshot() };
}

const paidWork = () => "the paid result";

test("it starts on the key screen, and the key unlocks it live; a restart offline stays unlocked", { skip }, async () => {
  const { key, licenseId } = await buy();
  const machineId = `os-id-first-${Math.random()}`;
  const app = await computer("first", { machineId });
  let cachePath;
  try {
    assert.deepEqual([app.license.snapshot().screen, app.license.snapshot().entitled], ["key", false]);
    await until(() => app.last().connection === "inactive", "waiting for a key");
    // The paid feature is refused by the main process while locked, whatever the window shows.
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: false, reason: "locked" });
    assert.deepEqual(await app.license.activate(key.toLowerCase()), { ok: true });
    assert.deepEqual([app.last().screen, app.last().entitled, app.last().status], ["app", true, "active"]);
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: true, result: "the paid result" });
    await until(() => app.last().connection === "live", "the stream");
    assert.equal(app.sent.at(-1)[0], "license:changed");
    assert.equal(app.license.client.licenseId, licenseId);
    cachePath = app.license.client.cache.path;
  } finally {
    app.license.stop();
  }
  // The app restarts with no network: the activation and the cached lease unlock it at once.
  const offline = await computer("first", { baseUrl: "http://127.0.0.1:9", cachePath, machineId });
  try {
    assert.deepEqual([offline.license.snapshot().screen, offline.license.snapshot().entitled], ["app", true]);
  } finally {
    offline.license.stop();
  }
});

test("a refund locks the paid feature in the main process at once", { skip }, async () => {
  const { key, licenseId } = await buy();
  const app = await computer("refund");
  try {
    assert.equal((await app.license.activate(key)).ok, true);
    await until(() => app.last().connection === "live", "the stream");
    await post("/dev/simulate", { license_id: licenseId, action: "refund" });
    await until(() => app.last().entitled === false, "locked by the refund");
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: false, reason: "locked" });
    assert.equal(app.last().status, "revoked");
  } finally {
    app.license.stop();
  }
});

test("limit reached: the list of computers, release one, this one activates, the other locks live", { skip }, async () => {
  const { key } = await buy();
  const [laptop, desktop] = [await computer("laptop"), await computer("desktop")];
  try {
    assert.equal((await laptop.license.activate(key)).ok, true);
    await until(() => laptop.last().connection === "live", "the laptop's stream");
    const full = await desktop.license.activate(key);
    assert.deepEqual([full.ok, full.error, full.max, full.machines.length], [false, "machine_limit_reached", 1, 1]);
    assert.equal(full.machines[0].id, laptop.license.client.machineId);
    assert.equal(desktop.license.snapshot().screen, "key");
    assert.deepEqual(await desktop.license.replace(full.machines[0].id, key), { ok: true });
    assert.deepEqual([desktop.last().screen, desktop.last().entitled], ["app", true]);
    // The laptop's stream ends: it is locked and back on the key screen, told why.
    await until(() => laptop.last().screen === "key", "the laptop released");
    assert.deepEqual([laptop.last().entitled, laptop.last().released], [false, true]);
    assert.deepEqual(laptop.license.run("pro-report", paidWork), { ok: false, reason: "locked" });
    // Deactivating this computer frees the place: the laptop takes it back.
    assert.deepEqual(await desktop.license.deactivate(), { ok: true });
    assert.deepEqual([desktop.last().screen, desktop.last().entitled], ["key", false]);
    assert.deepEqual(await laptop.license.activate(key), { ok: true });
    assert.deepEqual([laptop.last().screen, laptop.last().entitled, laptop.last().released], ["app", true, false]);
    await until(() => laptop.last().connection === "live", "the laptop's stream again");
  } finally {
    laptop.license.stop();
    desktop.license.stop();
  }
});

test("a typo and an unknown key are told apart, and nothing unlocks", { skip }, async () => {
  const app = await computer("typo");
  try {
    const { key } = await buy();
    const typo = await app.license.activate(`${key.slice(0, -1)}${key.endsWith("0") ? "1" : "0"}`);
    assert.deepEqual([typo.ok, typo.error], [false, "malformed_key"]);
    const unknown = await app.license.activate("PY9W9-WM8F2-WT0QD-EYJKS-7YMED"); // well formed, never issued here
    assert.deepEqual([unknown.ok, unknown.error], [false, "invalid_key"]);
    assert.deepEqual([app.license.snapshot().screen, app.license.snapshot().entitled], ["key", false]);
  } finally {
    app.license.stop();
  }
});

/** The app on a computer, against a broker that sells; `browser` records what it opened. */
async function sellingComputer(name, baseUrl = BUY_URL, options = {}) {
  const browser = [];
  const app = await computer(name, {
    baseUrl,
    publicKeys: [LEASE_PUBLIC_KEY],
    openUrl: async (url) => {
      browser.push(url);
    },
    ...options,
  });
  return { ...app, browser };
}

test("first run: Buy opens the checkout in the browser, and the window unlocks by itself once paid", { skip: skipSelling }, async () => {
  const app = await sellingComputer("buyer");
  try {
    assert.deepEqual([app.last().screen, app.last().entitled, app.last().trial, app.last().checkout], ["key", false, null, null]);
    await until(() => app.last().connection === "inactive", "the first screen");
    assert.deepEqual(await app.license.buy(), { ok: true });
    assert.equal(app.browser.length, 1);
    assert.ok(app.browser[0].startsWith(`${SHOP_URL}/pay/cs_test_`), app.browser[0]);
    assert.deepEqual([app.last().screen, app.last().entitled, typeof app.last().checkout.expiresAt], ["app", false, "string"]);
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: false, reason: "locked" });
    assert.deepEqual(await app.license.buy(), { ok: true }); // clicked again: the same page, no second checkout
    assert.deepEqual(app.browser, [app.browser[0], app.browser[0]]);
    await until(() => app.last().connection === "live", "the stream");
    // The buyer pays in the browser; nothing is typed in the app.
    const paid = await fetch(app.browser[0], { method: "POST" });
    assert.equal(paid.status, 200, await paid.text());
    await until(() => app.last().entitled, "unlocked by the payment");
    assert.deepEqual([app.last().status, app.last().checkout, app.last().notice], ["active", null, null]);
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: true, result: "the paid result" });
    await until(() => app.last().manageable, "something to manage");
    assert.deepEqual(await app.license.manage(), { ok: true });
    assert.ok(app.browser[2].startsWith(`${SHOP_URL}/portal/session/`), app.browser[2]);
  } finally {
    app.license.stop();
  }
});

test("a trial shows the days left, has nothing to manage, and is refused on the same computer again", { skip: skipSelling }, async () => {
  const machineId = `os-id-trial-${Math.random()}`;
  const app = await sellingComputer("trial", BUY_URL, { machineId });
  try {
    assert.deepEqual(await app.license.startTrial(), { ok: true });
    const { screen, entitled, status, trial, manageable } = app.last();
    assert.deepEqual([screen, entitled, status, trial.daysLeft, manageable], ["app", true, "trialing", 14, false]);
    assert.ok(Math.abs(Date.parse(trial.endsAt) - (Date.now() + 14 * 86_400_000)) < 60_000, trial.endsAt);
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: true, result: "the paid result" });
    const nothing = await app.license.manage();
    assert.deepEqual([nothing.ok, nothing.error], [false, "no_customer"]);
    assert.deepEqual(app.browser, []);
  } finally {
    app.license.stop();
  }
  const reinstalled = await sellingComputer("trial-again", BUY_URL, { machineId });
  try {
    const again = await reinstalled.license.startTrial();
    assert.deepEqual([again.ok, again.error, reinstalled.last().screen], [false, "trial_used", "key"]);
  } finally {
    reinstalled.license.stop();
  }
});

test("a trial locks the app when it ends, pushed by the stream", { skip: skipSelling }, async () => {
  const app = await sellingComputer("short", SHORT_TRIAL_URL);
  try {
    assert.deepEqual(await app.license.startTrial(), { ok: true });
    assert.deepEqual([app.last().entitled, app.last().trial.daysLeft], [true, 1]);
    const endsAt = Date.parse(app.last().trial.endsAt);
    await until(() => !app.last().entitled, "locked at the trial's end", 15_000);
    assert.ok(Date.now() >= endsAt - 1000, `${endsAt - Date.now()} ms early`);
    assert.deepEqual(app.license.run("pro-report", paidWork), { ok: false, reason: "locked" });
    await until(() => app.last().status === "expired", "the trial's end on the stream");
    assert.equal(app.last().trial, null);
  } finally {
    app.license.stop();
  }
});
