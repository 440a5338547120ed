// The example's main-process code (license.js) against a live broker: tests/test_node_client.py
// runs it, with BROKER_URL (development mode, signing with the key LEASE_PUBLIC_KEY_A verifies).
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { startLicense } from "./license.js";

const { BROKER_URL, LEASE_PUBLIC_KEY_A } = process.env;

async function dev(path, body) {
  const response = await fetch(`${BROKER_URL}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  assert.equal(response.status, 200);
  return response.json();
}

async function until(predicate, what) {
  const deadline = Date.now() + 10_000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

test("the windows are told to unlock on payment, and a restart offline stays unlocked", { skip: !BROKER_URL }, async () => {
  const licenseId = `lic_electron_${Date.now()}`;
  const cachePath = join(await mkdtemp(join(tmpdir(), "lb-electron-")), "license-lease");
  const sent = [];
  const options = {
    licenseId,
    getToken: async () => (await dev("/dev/token", { license_id: licenseId })).token,
    publicKeys: [LEASE_PUBLIC_KEY_A],
    cachePath,
    send: (channel, snapshot) => sent.push([channel, snapshot]),
  };
  const license = await startLicense({ ...options, baseUrl: BROKER_URL });
  const paidWork = () => "the paid result";
  try {
    await until(() => sent.some(([, s]) => s.connection === "live" && s.status === "none"), "the first lease");
    assert.equal(license.snapshot().entitled, false);
    // The paid feature is refused by the main process while locked, whatever the window shows.
    assert.deepEqual(license.run("pro-report", paidWork), { ok: false, reason: "locked" });
    await dev("/dev/simulate", { license_id: licenseId, action: "pay" });
    await until(() => sent.at(-1)[1].entitled, "unlocked");
    assert.deepEqual(sent.at(-1)[0], "license:changed");
    assert.equal(sent.at(-1)[1].status, "active");
    assert.deepEqual(license.run("pro-report", paidWork), { ok: true, result: "the paid result" });
  } finally {
    license.stop();
  }
  // The app restarts with no network: the cached lease unlocks it at once.
  const offline = await startLicense({ ...options, baseUrl: "http://127.0.0.1:9", send: () => {} });
  try {
    assert.equal(offline.snapshot().entitled, true);
  } finally {
    offline.stop();
  }
  const fresh = await startLicense({ ...options, baseUrl: "http://127.0.0.1:9", cachePath: `${cachePath}.none`, send: () => {} });
  try {
    assert.equal(fresh.snapshot().entitled, false);
  } finally {
    fresh.stop();
  }
});

test("a refund locks the paid feature in the main process at once", { skip: !BROKER_URL }, async () => {
  const licenseId = `lic_electron_refund_${Date.now()}`;
  const sent = [];
  const license = await startLicense({
    baseUrl: BROKER_URL,
    licenseId,
    getToken: async () => (await dev("/dev/token", { license_id: licenseId })).token,
    publicKeys: [LEASE_PUBLIC_KEY_A],
    cachePath: join(await mkdtemp(join(tmpdir(), "lb-electron-")), "license-lease"),
    send: (channel, snapshot) => sent.push(snapshot),
  });
  try {
    await dev("/dev/simulate", { license_id: licenseId, action: "pay" });
    await until(() => sent.at(-1)?.entitled, "unlocked");
    assert.equal(license.run("pro-report", () => 1).ok, true);
    await dev("/dev/simulate", { license_id: licenseId, action: "refund" });
    await until(() => sent.at(-1)?.entitled === false, "locked by the refund");
    assert.deepEqual(license.run("pro-report", () => 1), { ok: false, reason: "locked" });
    assert.equal(sent.at(-1).status, "revoked");
  } finally {
    license.stop();
  }
});
