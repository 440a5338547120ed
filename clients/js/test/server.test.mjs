// license-broker-client against a running license-broker (tests/test_node_client.py starts them
// and names them in the environment): development mode, so /dev/token and /dev/simulate exist.
//   BROKER_URL           signs with key A
//   BROKER_URL_ROTATING  signs with key B, still publishes A
//   BROKER_URL_ROTATED   signs with key B only
//   BROKER_URL_SHORT     key A; ends every connection after ~0.3 s, retry: 100
//   LEASE_PUBLIC_KEY_A   key A's public PEM, as an app pins it
//   LEASE_KEYS_PUBLIC    what `license-broker keys public` printed for BROKER_URL_ROTATING's
//                        setting (B signs, A published): comment lines and two PEM blocks
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { LeaseCache, LeaseVerifier, LicenseClient, UnauthorizedError } from "license-broker-client";
import { tamper, until } from "./helpers.mjs";

const { BROKER_URL, BROKER_URL_ROTATING, BROKER_URL_ROTATED, BROKER_URL_SHORT, LEASE_PUBLIC_KEY_A, LEASE_KEYS_PUBLIC } = process.env;
const skip = BROKER_URL ? false : "BROKER_URL is not set (tests/test_node_client.py runs these)";
const OFFLINE = "http://127.0.0.1:9";

const newLicense = () => `lic_js_${Math.random().toString(36).slice(2, 12)}`;
const pinned = (options = {}) => new LeaseVerifier({ publicKeys: [LEASE_PUBLIC_KEY_A], ...options });

async function post(url, path, body) {
  const response = await fetch(`${url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const text = await response.text();
  assert.equal(response.status, 200, `${path}: ${text}`);
  return JSON.parse(text);
}
const tokenFor = async (url, licenseId) => (await post(url, "/dev/token", { license_id: licenseId })).token;
const simulate = (url, licenseId, action) => post(url, "/dev/simulate", { license_id: licenseId, action });
async function servedLease(url, licenseId) {
  const response = await fetch(`${url}/api/licenses/${licenseId}`, { headers: { authorization: `Bearer ${await tokenFor(url, licenseId)}` } });
  return (await response.json()).lease;
}

test("the client unlocks and locks on verified leases, one per state, and caches the last", { skip }, async () => {
  const licenseId = newLicense();
  const dir = await mkdtemp(join(tmpdir(), "lb-js-"));
  const client = new LicenseClient({ baseUrl: BROKER_URL, licenseId, token: () => tokenFor(BROKER_URL, licenseId),
    verifier: pinned(), cache: join(dir, "lease") });
  const states = [];
  const leases = [];
  client.on("state", (state) => states.push(state));
  client.on("lease", (lease) => leases.push(lease));
  client.start();
  try {
    await until(() => leases.length === 1, "the first lease");
    assert.deepEqual([states[0].seq, states[0].status, client.isEntitled()], [0, "none", false]);
    await simulate(BROKER_URL, licenseId, "pay");
    await until(() => client.isEntitled(), "unlocked by a lease");
    await simulate(BROKER_URL, licenseId, "cancel");
    await until(() => !client.isEntitled(), "locked by a lease");
    assert.equal(client.lease.seq, client.state.seq);
    assert.equal(client.lastEventId, client.state.seq);
  } finally {
    client.stop();
  }
  assert.deepEqual(states.map((s) => s.seq), [...Array(states.length).keys()]); // each once, in order
  assert.equal(client.rejectedLeases, 0);
  const cached = await pinned().verify(await new LeaseCache(join(dir, "lease")).load(), licenseId);
  assert.deepEqual([cached.status, cached.entitled, cached.seq], ["canceled", false, client.state.seq]);
});

test("an app started offline is entitled by its cached lease and locked without one", { skip }, async () => {
  const licenseId = newLicense();
  const dir = await mkdtemp(join(tmpdir(), "lb-js-"));
  await simulate(BROKER_URL, licenseId, "pay");
  const online = new LicenseClient({ baseUrl: BROKER_URL, licenseId, token: () => tokenFor(BROKER_URL, licenseId),
    verifier: pinned(), cache: join(dir, "lease") });
  online.start();
  try {
    await until(() => online.isEntitled(), "the lease of the paid state");
  } finally {
    online.stop();
  }
  const restart = async (cache) => {
    const app = new LicenseClient({ baseUrl: OFFLINE, licenseId, token: "t", verifier: pinned(), cache });
    await app.restore();
    return app.isEntitled();
  };
  assert.equal(await restart(join(dir, "lease")), true);
  assert.equal(await restart(join(dir, "no-such-file")), false);
  const cache = new LeaseCache(join(dir, "lease"));
  await cache.save(tamper(await cache.load(), { exp: 4_000_000_000 }));
  assert.equal(await restart(join(dir, "lease")), false);
});

test("a served lease is refused when tampered, expired, or for another license", { skip }, async () => {
  const licenseId = newLicense();
  await simulate(BROKER_URL, licenseId, "pay");
  const token = await servedLease(BROKER_URL, licenseId);
  const lease = await pinned().verify(token, licenseId);
  assert.equal(lease.entitled, true);
  await assert.rejects(pinned().verify(tamper(token, { sub: "lic_mine_now" }), "lic_mine_now"), /does not verify/);
  await assert.rejects(pinned({ clock: () => lease.expiresAt * 1000 }).verify(token, licenseId), /expired/);
  await assert.rejects(pinned().verify(token, newLicense()), /another license/);
});

test("across a rotation the client verifies the keys it pins, from what `keys public` printed, and no other", { skip }, async () => {
  const licenseId = newLicense();
  await simulate(BROKER_URL, licenseId, "pay");
  const old = await servedLease(BROKER_URL, licenseId); // key A
  const current = await servedLease(BROKER_URL_ROTATED, licenseId); // key B
  assert.match(LEASE_KEYS_PUBLIC, /^(#.*\n)?-----BEGIN PUBLIC KEY-----/m);
  const both = new LeaseVerifier({ publicKeys: LEASE_KEYS_PUBLIC }); // the file's text, as the app reads it
  assert.equal((await both.verify(old, licenseId)).entitled, true);
  assert.equal((await both.verify(current, licenseId)).entitled, true);
  // An app that pins only A: B's leases are refused, whatever the broker's JWKS publishes.
  const jwks = await (await fetch(`${BROKER_URL_ROTATING}/.well-known/jwks.json`)).json();
  assert.equal(jwks.keys.length, 2);
  await assert.rejects(LeaseVerifier.forServer(BROKER_URL_ROTATING, { publicKeys: [LEASE_PUBLIC_KEY_A] }).verify(current, licenseId), /does not pin/);
  // And a live client that pins the printed keys unlocks on the rotated deployment.
  const client = new LicenseClient({ baseUrl: BROKER_URL_ROTATED, licenseId, token: () => tokenFor(BROKER_URL_ROTATED, licenseId), verifier: both });
  client.start();
  try {
    await until(() => client.isEntitled(), "unlocked by a lease of key B");
  } finally {
    client.stop();
  }
});

test("it resumes with Last-Event-ID across connections the server ends, honouring retry:", { skip }, async () => {
  const licenseId = newLicense();
  const client = new LicenseClient({ baseUrl: BROKER_URL_SHORT, licenseId, token: () => tokenFor(BROKER_URL_SHORT, licenseId),
    verifier: pinned(), minBackoffMs: 5000 }); // without the retry: hint, each reconnect would wait 2.5 s or more
  const seqs = [];
  client.on("state", (state) => seqs.push(state.seq));
  client.start();
  try {
    await until(() => client.connections >= 2, "a second connection");
    assert.equal(client.retryMs, 100);
    await simulate(BROKER_URL_SHORT, licenseId, "pay");
    const paid = (await (await fetch(`${BROKER_URL_SHORT}/api/licenses/${licenseId}`, {
      headers: { authorization: `Bearer ${await tokenFor(BROKER_URL_SHORT, licenseId)}` } })).json()).seq;
    await until(() => seqs.at(-1) === paid && client.isEntitled(), "the payment");
    const connections = client.connections;
    // ~0.3 s a connection and 50-200 ms between them (retry: 100, with backoff and jitter).
    await until(() => client.connections >= connections + 2, "two more connections", 4000);
  } finally {
    client.stop();
  }
  assert.deepEqual(seqs, [...Array(seqs.length).keys()]); // never replayed twice, nothing skipped
});

test("async iteration yields the states, and a refused token ends it with UnauthorizedError", { skip }, async () => {
  const licenseId = newLicense();
  const client = new LicenseClient({ baseUrl: BROKER_URL, licenseId, token: () => tokenFor(BROKER_URL, licenseId) });
  const seen = [];
  for await (const state of client) {
    seen.push(state);
    if (state.seq === 0) await simulate(BROKER_URL, licenseId, "pay");
    if (state.status === "active") break;
  }
  assert.equal(client.status, "stopped");
  assert.deepEqual(seen.map((s) => s.seq), [...Array(seen.length).keys()]);
  assert.equal(client.isEntitled(), true); // no verifier: the last state, unsigned

  const refused = new LicenseClient({ baseUrl: BROKER_URL, licenseId, token: () => tokenFor(BROKER_URL, newLicense()) });
  await assert.rejects(async () => {
    for await (const _ of refused) assert.fail("no state for a refused token");
  }, (error) => error instanceof UnauthorizedError && error.status === 403);
  assert.equal(refused.connections, 0);
});
