// license-broker-client's machine side without a server: the fingerprint (from each system's
// machine id, salted and hashed), the license key checked before sending, leases bound to a machine
// (a copy on another computer verifies nothing), the activation file, and the errors.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, readFile, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  BrokerError,
  BrokerUnavailableError,
  InvalidLeaseError,
  InvalidLicenseKeyError,
  LeaseVerifier,
  LicenseClient,
  MachineFile,
  MachineIdError,
  MachineLimitReachedError,
  MachineNotFoundError,
  MachineReleasedError,
  MalformedLicenseKeyError,
  machineFingerprint,
  NotActivatedError,
  NotOfferedError,
  normalizeLicenseKey,
  osMachineId,
  RateLimitedError,
  UnauthorizedError,
} from "license-broker-client";
import { SignJWT } from "jose";
import { LICENSE, NOW, newKey } from "./helpers.mjs";

const OFFLINE = "http://127.0.0.1:9"; // nothing listens there
const APP = "com.example.draw";
const KEY = "PY9W9-WM8F2-WT0QD-EYJKS-7YMED"; // docs/protocol.md's: its check characters hold
const tmp = () => mkdtemp(join(tmpdir(), "lb-machine-"));
const sha256 = (text) => createHash("sha256").update(text, "utf8").digest("hex");

async function boundLease(key, machine, fingerprint, { seq = 3 } = {}) {
  const claims = { sub: LICENSE, seq, status: "active", entitled: true, features: [], current_period_end: null };
  if (machine !== undefined) claims.machine = machine;
  if (fingerprint !== undefined) claims.fingerprint = fingerprint;
  return new SignJWT(claims).setProtectedHeader({ alg: "EdDSA", kid: key.kid }).setIssuedAt(NOW / 1000)
    .setExpirationTime(NOW / 1000 + 600).sign(key.privateKey);
}

// --- the fingerprint ----------------------------------------------------------------------------

test("the fingerprint is the salted SHA-256 of the OS machine id, never the id", async () => {
  const dir = await tmp();
  await writeFile(join(dir, "machine-id"), "3D1219C7C4C5404AAA1F6D2A48ADFDA4\n");
  const raw = await osMachineId("linux", { linuxPaths: [join(dir, "machine-id")] });
  assert.equal(raw, "3D1219C7C4C5404AAA1F6D2A48ADFDA4");
  const fingerprint = await machineFingerprint(APP, { machineId: raw });
  assert.equal(fingerprint, sha256("com.example.draw3d1219c7c4c5404aaa1f6d2a48adfda4"));
  assert.ok(!fingerprint.includes(raw.toLowerCase()));
  assert.notEqual(await machineFingerprint("com.example.other", { machineId: raw }), fingerprint); // another app
  assert.equal(await machineFingerprint(APP, { machineId: " 3d1219c7c4c5404aaa1f6d2a48adfda4\n" }), fingerprint);
});

test("on this Linux machine it is read from /etc/machine-id", { skip: process.platform !== "linux" }, async () => {
  const path = ["/etc/machine-id", "/var/lib/dbus/machine-id"].find((p) => existsSync(p) && readFileSync(p, "ascii").trim());
  if (path === undefined) return; // no machine id on this machine
  const expected = sha256(APP + readFileSync(path, "ascii").trim().toLowerCase());
  assert.equal(await machineFingerprint(APP), expected);
  assert.equal(await machineFingerprint(APP), await machineFingerprint(APP)); // nothing random, nothing stored
});

test("Linux falls back to D-Bus's id and refuses an uninitialised or missing one", async () => {
  const dir = await tmp();
  await writeFile(join(dir, "etc"), "uninitialized\n");
  await writeFile(join(dir, "dbus"), "b08dfa6083e7567a1921a715000001fb\n");
  assert.equal(await osMachineId("linux", { linuxPaths: [join(dir, "etc"), join(dir, "dbus")] }), "b08dfa6083e7567a1921a715000001fb");
  await assert.rejects(osMachineId("linux", { linuxPaths: [join(dir, "etc"), join(dir, "missing")] }), MachineIdError);
});

test("macOS reads IOPlatformUUID from ioreg, Windows MachineGuid from the 64-bit registry", async () => {
  const calls = [];
  const exec = async (file, args) => {
    calls.push([file, args]);
    if (file === "ioreg") {
      return '+-o J314sAP  <class IOPlatformExpertDevice>\n    "IOPlatformSerialNumber" = "C02X"\n    "IOPlatformUUID" = "6B29FC40-CA47-1067-B31D-00DD010662DA"\n';
    }
    return "\r\nHKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Cryptography\r\n    MachineGuid    REG_SZ    c6f8e3a2-5b1d-4e7f-9a0c-2d3b4c5d6e7f\r\n\r\n";
  };
  assert.equal(await osMachineId("darwin", { exec }), "6B29FC40-CA47-1067-B31D-00DD010662DA");
  assert.equal(await osMachineId("win32", { exec }), "c6f8e3a2-5b1d-4e7f-9a0c-2d3b4c5d6e7f");
  assert.deepEqual(calls[0], ["ioreg", ["-rd1", "-c", "IOPlatformExpertDevice"]]);
  assert.match(calls[1][0], /\\System32\\reg\.exe$/);
  assert.deepEqual(calls[1][1], ["query", "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Cryptography", "/v", "MachineGuid", "/reg:64"]);
  await assert.rejects(osMachineId("darwin", { exec: async () => "nothing" }), /IOPlatformUUID/);
  await assert.rejects(osMachineId("darwin", { exec: async () => { throw new Error("ENOENT"); } }), MachineIdError);
  await assert.rejects(osMachineId("plan9"), /pass machineId/);
  await assert.rejects(machineFingerprint("", { machineId: "abc" }), /appId/);
  assert.throws(() => new LicenseClient({ baseUrl: OFFLINE, appId: "" }), /appId/);
});

// --- the license key ----------------------------------------------------------------------------

test("a key is read as the broker reads it, and a typo is malformed before anything is sent", async () => {
  assert.equal(normalizeLicenseKey(KEY), KEY);
  assert.equal(normalizeLicenseKey(" py9w9 wm8f2\twt0qd\u2013eyjks-7ymed "), KEY);
  assert.equal(normalizeLicenseKey("PY9W9-WM8F2-WTOQD-EYJKS-7YMED"), KEY); // O read as 0
  for (const typo of ["PY9W9-WM8F2-WT0QD-EYJKS-7YMEE", "PY9W9-WM8F2-WT0QD-EYJKS-7YME", "YP9W9-WM8F2-WT0QD-EYJKS-7YMED", "", "x".repeat(101)]) {
    assert.throws(() => normalizeLicenseKey(typo), MalformedLicenseKeyError);
  }
  const requests = [];
  const fetch = async (url) => (requests.push(url), new Response("{}", { status: 500 }));
  const client = new LicenseClient({ baseUrl: OFFLINE, appId: APP, machineId: "m1", cache: join(await tmp(), "lease"), fetch });
  await assert.rejects(client.activate(`${KEY.slice(0, -1)}E`), /typo/);
  await assert.rejects(client.machines({ key: "not a key" }), MalformedLicenseKeyError);
  await assert.rejects(client.machines(), NotActivatedError);
  assert.throws(() => client.licenseId, NotActivatedError);
  assert.deepEqual(requests, []);
  assert.equal(client.activated, false);
});

test("a client follows either a token or an activation", async () => {
  assert.throws(() => new LicenseClient({ baseUrl: OFFLINE }), /licenseId and token/);
  assert.throws(() => new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE }), /licenseId and token/);
  assert.throws(() => new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", appId: APP }), /activate\(key\)/);
  const tokenClient = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t" });
  assert.equal(tokenClient.licenseId, LICENSE);
  assert.equal(tokenClient.url, `${OFFLINE}/api/licenses/${LICENSE}/events`);
  await assert.rejects(tokenClient.activate(KEY), /appId/);
});

// --- leases bound to a machine ------------------------------------------------------------------

test("a lease issued to a machine verifies only on that machine", async () => {
  const key = await newKey();
  const verifier = new LeaseVerifier({ publicKeys: [key.pem], clock: () => NOW });
  const here = { machineId: "mch_a", fingerprint: await machineFingerprint(APP, { machineId: "machine-a" }) };
  const elsewhere = { machineId: "mch_a", fingerprint: await machineFingerprint(APP, { machineId: "machine-b" }) };
  const lease = await boundLease(key, "mch_a", here.fingerprint);
  const verified = await verifier.verify(lease, LICENSE, { machine: here });
  assert.deepEqual([verified.machineId, verified.fingerprint, verified.entitled], ["mch_a", here.fingerprint, true]);
  await assert.rejects(verifier.verify(lease, LICENSE, { machine: elsewhere }), /another computer/); // copied
  await assert.rejects(verifier.verify(lease, LICENSE, { machine: { ...here, machineId: "mch_b" } }), /another machine/);
  await assert.rejects(verifier.verify(lease, LICENSE), /no machine activated/); // a token client takes none
  await assert.rejects(verifier.verify(await boundLease(key), LICENSE, { machine: here }), /another machine/);
  await assert.rejects(verifier.verify(await boundLease(key, "mch_a"), LICENSE, { machine: here }), /another computer/);
  assert.equal((await verifier.verify(await boundLease(key), LICENSE)).machineId, null); // 0.2's leases as before
});

async function activatedApp(key, dir, osId) {
  const verifier = new LeaseVerifier({ publicKeys: [key.pem], clock: () => NOW });
  const client = new LicenseClient({ baseUrl: OFFLINE, appId: APP, machineId: osId, verifier, cache: join(dir, "lease") });
  await client.restore();
  return client;
}

test("the files of an activated app copied to another computer unlock nothing there", async () => {
  const key = await newKey();
  const root = await tmp();
  const [here, there] = [join(root, "here"), join(root, "there")];
  const fingerprintA = await machineFingerprint(APP, { machineId: "machine-a" });
  await new MachineFile(join(here, "lease.machine")).save({ licenseId: LICENSE, machineId: "mch_a", token: "machine-token" });
  const first = await activatedApp(key, here, "machine-a");
  assert.notEqual(await first.acceptLease(await boundLease(key, "mch_a", fingerprintA)), null);
  assert.equal(first.isEntitled(), true);
  assert.equal((await activatedApp(key, here, "machine-a")).isEntitled(), true); // restarted offline, same machine
  await mkdir(there);
  for (const name of ["lease", "lease.watermark", "lease.machine"]) await writeFile(join(there, name), await readFile(join(here, name)));
  const copied = await activatedApp(key, there, "machine-b");
  assert.deepEqual([copied.activated, copied.machineId, copied.lease, copied.isEntitled()], [true, "mch_a", null, false]);
  assert.notEqual(copied.fingerprint, fingerprintA);
  const rejected = [];
  copied.on("rejected", (error) => rejected.push(error));
  assert.equal(await copied.acceptLease(await boundLease(key, "mch_a", fingerprintA, { seq: 4 })), null);
  assert.equal(copied.isEntitled(), false);
  assert.match(rejected[0].message, /another computer/);
  assert.ok(rejected[0] instanceof InvalidLeaseError);
});

test("the activation file is the user's only", async () => {
  const file = new MachineFile(join(await tmp(), "app", "lease.machine"));
  await file.save({ licenseId: LICENSE, machineId: "mch_a", token: "secret-token" });
  assert.equal((await stat(file.path)).mode & 0o777, 0o600);
  assert.deepEqual(await file.load(), { licenseId: LICENSE, machineId: "mch_a", token: "secret-token" });
  assert.deepEqual(JSON.parse(await readFile(file.path, "utf8")), { license_id: LICENSE, machine_id: "mch_a", token: "secret-token" });
  await writeFile(file.path, "{not json");
  assert.equal(await file.load(), null);
  await file.clear();
  await file.clear(); // twice: nothing to remove
  assert.equal(await file.load(), null);
});

// --- the broker's refusals, one error each ------------------------------------------------------

async function refusal(status, body, headers = {}) {
  const fetch = async () => new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json", ...headers } });
  const client = new LicenseClient({ baseUrl: OFFLINE, appId: APP, machineId: "m1", fetch });
  return client.activate(KEY).then(() => assert.fail("no error"), (error) => error);
}

test("each refusal of the broker is its own error, with a code that survives IPC", async () => {
  const full = await refusal(409, { error: "machine limit reached", max: 2, machines: [
    { id: "mch_1", name: "laptop", platform: "darwin", created_at: "2026-01-01T00:00:00+00:00", last_seen_at: "2026-01-02T00:00:00+00:00" }] });
  assert.ok(full instanceof MachineLimitReachedError && full instanceof BrokerError);
  assert.deepEqual([full.code, full.status, full.max], ["machine_limit_reached", 409, 2]);
  assert.deepEqual(full.machines, [{ id: "mch_1", name: "laptop", platform: "darwin", createdAt: "2026-01-01T00:00:00+00:00",
    lastSeenAt: "2026-01-02T00:00:00+00:00", current: false }]);
  assert.ok((await refusal(400, { error: "malformed key" })) instanceof MalformedLicenseKeyError);
  assert.equal((await refusal(403, { error: "invalid key" })).code, "invalid_key");
  assert.ok((await refusal(403, { error: "invalid key" })) instanceof InvalidLicenseKeyError);
  const released = await refusal(401, { error: "machine released" });
  assert.ok(released instanceof MachineReleasedError && released instanceof UnauthorizedError);
  assert.deepEqual([released.code, released.status], ["machine_released", 401]);
  assert.equal((await refusal(401, { error: "invalid token" })).constructor, UnauthorizedError);
  const limited = await refusal(429, { error: "too many failed attempts, try again later" }, { "retry-after": "37" });
  assert.ok(limited instanceof RateLimitedError);
  assert.equal(limited.retryAfter, 37);
  assert.ok((await refusal(404, { error: "no such machine" })) instanceof MachineNotFoundError);
  const down = await refusal(503, { error: "database unavailable" }, { "retry-after": "2" });
  assert.ok(down instanceof BrokerUnavailableError);
  assert.equal(down.retryAfter, 2);
  const off = await refusal(404, { error: "license keys are off on this server (LICENSE_KEY_SECRET is not set)" });
  assert.ok(off instanceof NotOfferedError && off instanceof BrokerError && off.code === "not_offered", String(off));
  assert.match(off.message, /LICENSE_KEY_SECRET/);
  const offline = await new LicenseClient({ baseUrl: OFFLINE, appId: APP, machineId: "m1" }).activate(KEY).catch((e) => e);
  assert.ok(offline instanceof BrokerUnavailableError);
  assert.equal(offline.status, null);
  // 0.2's constructor still works.
  assert.equal(new UnauthorizedError(403).status, 403);
});
