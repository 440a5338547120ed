// license-broker-client with license keys, against two broker processes' worth of apps on one
// Postgres database and one Redis (tests/test_node_client.py starts them and names them here):
//   KEYS_URL, KEYS_URL_2  two brokers (webhook and stream each), LICENSE_MAX_MACHINES 2,
//                         MACHINE_TOKEN_TTL 60 s, their sweeps every 30 s (a release's notice
//                         travels through Redis)
//   LEASE_PUBLIC_KEY      the key their leases are signed with, as an app pins it
//   TOKEN_SECRET          their STREAM_TOKEN_SECRET (to age a machine token)
//   BROKER_PYTHON, BROKER_ROOT, CLI_ENV   to run `license-broker send` and `license-broker key`
//   PREPAID               [{license_id, key}] of licenses paid for (signed webhooks)
//   UNISSUED_KEY          a well-formed key no license has
//   KEY_CASES             a JSON file of [typed, what the broker reads or null]
//   PY_FINGERPRINT        the Python client's machine_fingerprint("com.example.draw") here ("" if none)
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { SignJWT } from "jose";
import {
  InvalidLicenseKeyError,
  LeaseVerifier,
  LicenseClient,
  MachineLimitReachedError,
  MachineReleasedError,
  machineFingerprint,
  normalizeLicenseKey,
  RateLimitedError,
} from "license-broker-client";
import { until } from "./helpers.mjs";

const { KEYS_URL, KEYS_URL_2, LEASE_PUBLIC_KEY, TOKEN_SECRET, BROKER_PYTHON, BROKER_ROOT, CLI_ENV, UNISSUED_KEY, KEY_CASES, PY_FINGERPRINT } = process.env;
const skip = KEYS_URL ? false : "KEYS_URL is not set (tests/test_node_client.py runs these)";
const PREPAID = KEYS_URL ? JSON.parse(process.env.PREPAID) : [];
const APP = "com.example.draw";

const tmp = () => mkdtemp(join(tmpdir(), "lb-keys-"));
const claimsOf = (token) => JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString());
const machineFile = async (dir) => JSON.parse(await readFile(join(dir, "lease.machine"), "utf8"));

/** The app on one computer (`osId`: its OS machine id), its files in `dir`. */
function appOn(baseUrl, dir, osId, options = {}) {
  return new LicenseClient({ baseUrl, appId: APP, machineId: osId, verifier: new LeaseVerifier({ publicKeys: [LEASE_PUBLIC_KEY] }),
    cache: join(dir, "lease"), minBackoffMs: 50, maxBackoffMs: 500, ...options });
}

/** `license-broker <args>`, as the seller runs it. */
function cli(...args) {
  return execFileSync(BROKER_PYTHON, ["-m", "license_broker", ...args], { cwd: BROKER_ROOT, env: JSON.parse(CLI_ENV), encoding: "utf8" });
}

test("bought with the CLI: two machines, the third meets the limit with the list, a release ends the first's stream, the third takes its place", { skip }, async (t) => {
  const licenseId = `lic_js_keys_${Math.random().toString(36).slice(2, 12)}`;
  assert.match(cli("send", "pay", licenseId, "--url", KEYS_URL), /checkout\.session\.completed .* -> 200/);
  const key = cli("key", licenseId).trim();
  const root = await tmp();
  const laptop = appOn(KEYS_URL, join(root, "laptop"), "os-id-laptop");
  const statuses = [];
  laptop.on("status", (status) => statuses.push([Date.now(), status]));
  const desktop = appOn(KEYS_URL, join(root, "desktop"), "os-id-desktop");
  const newcomer = appOn(KEYS_URL_2, join(root, "new"), "os-id-new");
  try {
    laptop.start();
    await until(() => laptop.status === "inactive", "waiting for a key");
    const activation = await laptop.activate(key.toLowerCase(), { name: "old laptop" });
    assert.deepEqual([activation.created, activation.licenseId, activation.used, activation.max], [true, licenseId, 1, 2]);
    assert.equal(laptop.isEntitled(), true); // the activation's own lease, before the stream says anything
    assert.equal(laptop.lease.machineId, laptop.machineId);
    assert.equal(laptop.lease.fingerprint, await machineFingerprint(APP, { machineId: "os-id-laptop" }));
    await until(() => laptop.status === "live" && laptop.state?.license_id === licenseId, "the laptop live");
    desktop.start();
    await desktop.activate(key, { name: "desktop" });
    await until(() => desktop.status === "live" && desktop.isEntitled(), "the desktop live");

    const full = await newcomer.activate(key, { name: "new computer" }).catch((error) => error);
    assert.ok(full instanceof MachineLimitReachedError, String(full));
    assert.equal(full.max, 2);
    assert.deepEqual(full.machines.map((m) => [m.name, m.id]), [["old laptop", laptop.machineId], ["desktop", desktop.machineId]]);
    const listed = await newcomer.machines({ key }); // no token yet: the key lists them
    assert.deepEqual([listed.used, listed.max, listed.machines.map((m) => m.current)], [2, 2, [false, false]]);
    assert.deepEqual((await desktop.machines()).machines.map((m) => m.current), [false, true]);

    const oldToken = (await machineFile(join(root, "laptop"))).token;
    const releasedAt = Date.now();
    await newcomer.release(full.machines[0].id, { key }); // through the other broker
    // Its stream ends at once (the broker's notice, through Redis); the client learns why when it
    // reconnects, after its backoff: 401 machine released.
    await until(() => laptop.status === "unauthorized", "the released laptop's client to stop", 5_000);
    const endedAfter = statuses.find(([at, status]) => at >= releasedAt && status === "reconnecting")[0] - releasedAt;
    assert.ok(laptop.unauthorized instanceof MachineReleasedError);
    assert.deepEqual([laptop.activated, laptop.isEntitled(), laptop.lease], [false, false, null]);
    await until(() => !existsSync(join(root, "laptop", "lease.machine")) && !existsSync(join(root, "laptop", "lease")), "forgotten");
    assert.ok(existsSync(join(root, "laptop", "lease.watermark"))); // no older lease comes back
    const refused = await fetch(`${KEYS_URL_2}/api/machines`, { headers: { authorization: `Bearer ${oldToken}` } });
    assert.deepEqual([refused.status, await refused.json()], [401, { error: "machine released" }]);

    const again = await newcomer.activate(key, { name: "new computer" });
    assert.deepEqual([again.created, again.used, again.max], [true, 2, 2]);
    newcomer.start();
    await until(() => newcomer.status === "live" && newcomer.isEntitled(), "the new computer live");
    assert.deepEqual([desktop.status, desktop.isEntitled()], ["live", true]); // the others carry on
    t.diagnostic(`release to the end of its stream: ${endedAfter} ms`);
    assert.ok(endedAfter < 1_000, `${endedAfter} ms`);
  } finally {
    for (const client of [laptop, desktop, newcomer]) client.stop();
  }
});

test("a genuine lease bound to one computer is refused on another", { skip }, async () => {
  const { key } = PREPAID[0];
  const root = await tmp();
  const original = appOn(KEYS_URL, join(root, "a"), "os-id-a");
  const activation = await original.activate(key);
  assert.notEqual(activation.lease, null);
  assert.equal(original.isEntitled(), true);
  // Every file of the app copied to computer B, the machine token (still honoured) included.
  for (const name of ["lease", "lease.watermark", "lease.machine"]) {
    await writeFile(join(root, `b-${name}`), await readFile(join(root, "a", name)));
  }
  const copy = appOn(KEYS_URL, root, "os-id-b", { cache: join(root, "b-lease"), machineFile: join(root, "b-lease.machine") });
  const rejected = [];
  copy.on("rejected", (error) => rejected.push(error.message));
  await copy.restore();
  assert.deepEqual([copy.activated, copy.lease, copy.isEntitled()], [true, null, false]);
  assert.equal(await copy.acceptLease(activation.lease), null);
  copy.start(); // following the stream with the copied token: every lease names computer A
  try {
    await until(() => rejected.length >= 2 && copy.state !== null, "the stream's lease");
    assert.equal(copy.state.entitled, true); // the unsigned state says paid; nothing unlocks
    assert.deepEqual([copy.isEntitled(), copy.lease], [false, null]);
  } finally {
    copy.stop();
  }
  assert.ok(rejected.every((message) => /another computer/.test(message)), rejected.join("; "));
});

test("the machine token is renewed before connecting, and on the stream when that fails", { skip }, async () => {
  const { key, license_id: licenseId } = PREPAID[1];
  const dir = await tmp();
  await appOn(KEYS_URL, dir, "os-id").activate(key);
  const stored = await machineFile(dir);
  // The token as it was 40 s ago: more than half of its 60 s spent (re-signed as the broker would).
  const claims = claimsOf(stored.token);
  const now = Math.floor(Date.now() / 1000);
  const old = await new SignJWT({ ...claims, iat: now - 40, exp: now + 20 }).setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .sign(new TextEncoder().encode(TOKEN_SECRET));
  const renewals = [];
  const counting = (fail) => async (input, init = {}) => {
    if (String(input).endsWith("/token") && init.method === "POST") {
      renewals.push(fail ? 503 : 200);
      if (fail) return new Response('{"error":"database unavailable"}', { status: 503 });
    }
    return fetch(input, init);
  };
  for (const fail of [false, true]) {
    await writeFile(join(dir, "lease.machine"), JSON.stringify({ ...stored, token: old }));
    const client = appOn(KEYS_URL, dir, "os-id", { fetch: counting(fail) });
    client.start();
    try {
      await until(async () => (await machineFile(dir)).token !== old, fail ? "renewed on the stream" : "renewed by request");
      await until(() => client.isEntitled(), "unlocked");
    } finally {
      client.stop();
    }
    const renewed = claimsOf((await machineFile(dir)).token);
    assert.deepEqual([renewed.sub, renewed.machine], [licenseId, stored.machine_id]);
    assert.ok(renewed.exp >= now + 50, `${renewed.exp - now}`);
  }
  assert.deepEqual(renewals, [200, 503]);
});

test("another key switches the license live; deactivate frees the place and waits for a key", { skip }, async () => {
  const [first, second] = [PREPAID[2], PREPAID[3]];
  const client = appOn(KEYS_URL, await tmp(), "os-id-switch");
  const states = [];
  client.on("state", (state) => states.push(state));
  client.start();
  try {
    await client.activate(first.key);
    await until(() => states.at(-1)?.license_id === first.license_id && client.isEntitled(), "the first license");
    const second_ = await client.activate(second.key);
    assert.equal(second_.licenseId, second.license_id);
    await until(() => states.at(-1)?.license_id === second.license_id, "the second license's state");
    assert.deepEqual([client.licenseId, client.isEntitled(), client.lease.licenseId], [second.license_id, true, second.license_id]);
    await client.deactivate();
    await until(() => client.status === "inactive", "waiting for a key again");
    assert.deepEqual([client.activated, client.isEntitled()], [false, false]);
    assert.equal((await client.machines({ key: second.key })).used, 0);
  } finally {
    client.stop();
  }
});

test("an unknown key is refused, then the address is rate-limited with a Retry-After", { skip }, async () => {
  const address = `10.${[0, 0, 0].map(() => Math.floor(Math.random() * 250) + 1).join(".")}`;
  const fromElsewhere = (input, init = {}) => {
    const headers = new Headers(init.headers);
    headers.set("x-forwarded-for", address); // these requests have an address of their own
    return fetch(input, { ...init, headers });
  };
  const dir = await tmp();
  const client = appOn(KEYS_URL, dir, "os-id-guess", { fetch: fromElsewhere });
  for (let i = 0; i < 10; i++) await assert.rejects(client.activate(UNISSUED_KEY), InvalidLicenseKeyError);
  const limited = await client.activate(UNISSUED_KEY).catch((error) => error);
  assert.ok(limited instanceof RateLimitedError, String(limited));
  assert.ok(limited.retryAfter > 0 && limited.retryAfter <= 60, String(limited.retryAfter));
  assert.deepEqual([client.activated, existsSync(join(dir, "lease.machine"))], [false, false]);
});

test("the client reads every key as the broker does", { skip }, async () => {
  const cases = JSON.parse(await readFile(KEY_CASES, "utf8"));
  assert.ok(cases.length > 1000);
  for (const [typed, expected] of cases) {
    let got;
    try {
      got = normalizeLicenseKey(typed);
    } catch {
      got = null;
    }
    assert.equal(got, expected, typed);
  }
});

test("both clients compute the same fingerprint on this machine", { skip: skip || (PY_FINGERPRINT ? false : "no machine id here") }, async () => {
  assert.equal(await machineFingerprint(APP), PY_FINGERPRINT);
});
