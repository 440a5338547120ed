// license-broker-client without a server: lease verification, the cache, offline answers, backoff.
import assert from "node:assert/strict";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { SignJWT } from "jose";
import { InvalidLeaseError, LeaseCache, LeaseVerifier, LicenseClient } from "license-broker-client";
import { jwksServer, LICENSE, NOW, newKey, signLease, tamper } from "./helpers.mjs";

const OFFLINE = "http://127.0.0.1:9"; // nothing listens there: these clients never connect
const pinned = (key, clock = () => NOW) => new LeaseVerifier({ publicKeys: [key.pem], clock });
const tmp = () => mkdtemp(join(tmpdir(), "lb-client-"));

test("a lease verifies with the pinned key and says what the broker signed", async () => {
  const key = await newKey();
  const lease = await pinned(key).verifyOffline(await signLease(key), LICENSE);
  assert.deepEqual([lease.licenseId, lease.seq, lease.entitled, lease.features], [LICENSE, 3, true, ["pro"]]);
  assert.equal(lease.expiresAt, NOW / 1000 + 600);
  assert.equal(lease.kid, key.kid);
});

test("a tampered lease is rejected", async () => {
  const key = await newKey();
  const unpaid = await signLease(key, { entitled: false });
  await assert.rejects(pinned(key).verifyOffline(tamper(unpaid, { entitled: true }), LICENSE), /does not verify/);
  await assert.rejects(pinned(key).verifyOffline(tamper(unpaid, { exp: NOW / 1000 + 1e9 }), LICENSE), InvalidLeaseError);
  const [h, p, s] = unpaid.split(".");
  await assert.rejects(pinned(key).verifyOffline(`${h}.${p}.${s.slice(0, -4)}AAAA`, LICENSE), /does not verify/);
});

test("a lease signed by another key, or claiming a trusted kid, or not EdDSA, is rejected", async () => {
  const key = await newKey();
  const other = await newKey();
  await assert.rejects(pinned(key).verifyOffline(await signLease(other), LICENSE), /unknown key/);
  const spoofed = await signLease({ ...other, kid: key.kid });
  await assert.rejects(pinned(key).verifyOffline(spoofed, LICENSE), /does not verify/);
  const hs256 = await new SignJWT({ sub: LICENSE, seq: 9, entitled: true }).setProtectedHeader({ alg: "HS256" })
    .setIssuedAt().setExpirationTime("1h").sign(new Uint8Array(32));
  await assert.rejects(pinned(key).verifyOffline(hs256, LICENSE), /algorithm HS256/);
});

test("an expired lease is rejected and stops entitling while the app runs", async () => {
  const key = await newKey();
  const token = await signLease(key, { ttl: 600 });
  await assert.rejects(pinned(key, () => NOW + 600_000).verifyOffline(token, LICENSE), /expired/);
  const dir = await tmp();
  await new LeaseCache(join(dir, "lease")).save(token);
  let now = NOW;
  const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache: join(dir, "lease"),
    verifier: pinned(key, () => now) });
  await client.restore();
  assert.equal(client.isEntitled(), true);
  now = NOW + 600_000; // offline, the lease runs out
  assert.equal(client.isEntitled(), false);
});

test("a lease for another license is refused", async () => {
  const key = await newKey();
  const theirs = await signLease(key, { sub: "lic_someone_else" });
  await assert.rejects(pinned(key).verifyOffline(theirs, LICENSE), /another license/);
  const dir = await tmp();
  await new LeaseCache(join(dir, "lease")).save(theirs);
  const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache: join(dir, "lease"), verifier: pinned(key) });
  assert.equal(await client.restore(), null);
  assert.equal(client.isEntitled(), false);
});

test("an app started offline is entitled by a valid cached lease and locked without one", async () => {
  const key = await newKey();
  const dir = await tmp();
  const app = async (file, verifier = pinned(key)) => {
    const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache: join(dir, file), verifier });
    await client.restore();
    return client.isEntitled();
  };
  await new LeaseCache(join(dir, "good")).save(await signLease(key));
  assert.equal(await app("good"), true);
  assert.equal(await app("missing"), false);
  await writeFile(join(dir, "garbage"), "\xff not a lease");
  assert.equal(await app("garbage"), false);
  await new LeaseCache(join(dir, "unpaid")).save(await signLease(key, { entitled: false }));
  assert.equal(await app("unpaid"), false);
  // Without a verifier nothing on disk is trusted.
  const unverified = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache: join(dir, "good") });
  await unverified.restore();
  assert.equal(unverified.isEntitled(), false);
});

test("accepted leases are cached and an older state never replaces a newer one", async () => {
  const key = await newKey();
  const dir = await tmp();
  const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache: join(dir, "lease"), verifier: pinned(key) });
  const seen = [];
  client.on("lease", (lease) => seen.push(lease.seq));
  const five = await signLease(key, { seq: 5, entitled: false });
  assert.notEqual(await client.acceptLease(five), null);
  assert.equal(await client.acceptLease(await signLease(key, { seq: 4, entitled: true })), null); // replayed
  assert.equal(await client.acceptLease(await signLease(key, { seq: 9, sub: "lic_other" })), null);
  assert.deepEqual([seen, client.isEntitled(), client.rejectedLeases], [[5], false, 1]);
  assert.equal(await new LeaseCache(join(dir, "lease")).load(), five);
  await client.acceptLease(await signLease(key, { seq: 6, entitled: true }));
  assert.deepEqual([seen, client.isEntitled()], [[5, 6], true]);
});

test("after a rotation the old key verifies until the JWKS drops it", async () => {
  const [old, next] = [await newKey(), await newKey()];
  let published = [old.jwk];
  const jwks = await jwksServer(() => published);
  try {
    const oldLease = await signLease(old);
    const newLease = await signLease(next, { seq: 4 });
    const verifier = new LeaseVerifier({ jwksUrl: jwks.url, jwksMaxAgeMs: 0, jwksCooldownMs: 0, clock: () => NOW });
    assert.equal((await verifier.verify(oldLease, LICENSE)).kid, old.kid);
    published = [next.jwk, old.jwk]; // the new key signs; the old one stays published
    assert.equal((await verifier.verify(newLease, LICENSE)).seq, 4);
    assert.equal((await verifier.verify(oldLease, LICENSE)).seq, 3);
    published = [next.jwk]; // the old key removed
    await assert.rejects(verifier.verify(oldLease, LICENSE), /unknown key/);
    assert.equal((await verifier.verify(newLease, LICENSE)).seq, 4);
    assert.ok(jwks.fetches >= 3);
    // Offline verification never fetches: only pinned keys count.
    await assert.rejects(verifier.verifyOffline(newLease, LICENSE), /unknown key/);
  } finally {
    await jwks.close();
  }
});

test("the backoff doubles with each failure up to the cap, with jitter, from the retry hint", () => {
  const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", minBackoffMs: 500, maxBackoffMs: 4000 });
  for (const [failures, ceiling] of [[1, 500], [2, 1000], [3, 2000], [4, 4000], [9, 4000]]) {
    const delays = Array.from({ length: 200 }, () => client.reconnectDelay(failures));
    assert.ok(delays.every((d) => d >= ceiling / 2 && d <= ceiling), `${failures}: ${delays}`);
    assert.ok(Math.max(...delays) - Math.min(...delays) > ceiling / 10, "jittered, not constant");
  }
  client.retryMs = 2000; // as after a `retry: 2000` line
  const delay = client.reconnectDelay(1);
  assert.ok(delay >= 1000 && delay <= 2000);
});

test("a verifier needs some key", () => {
  assert.throws(() => new LeaseVerifier({}), /needs publicKeys/);
});
