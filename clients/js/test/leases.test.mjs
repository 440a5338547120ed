// license-broker-client without a server: lease verification, pinned keys, the cache and the
// watermark, offline answers, the clock, the expiry timer, backoff.
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { SignJWT } from "jose";
import { InvalidKeyError, InvalidLeaseError, LeaseCache, LeaseVerifier, LicenseClient, Watermark } from "license-broker-client";
import { keysPublicOutput, LICENSE, NOW, newKey, signLease, tamper } from "./helpers.mjs";

const OFFLINE = "http://127.0.0.1:9"; // nothing listens there: these clients never connect
const pinned = (key, clock = () => NOW) => new LeaseVerifier({ publicKeys: [key.pem], clock });
const tmp = () => mkdtemp(join(tmpdir(), "lb-client-"));

/** The app started offline with `cache` as its lease cache (and its watermark beside it). */
async function app(key, cache, clock = () => NOW, options = {}) {
  const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache, verifier: pinned(key, clock), ...options });
  await client.restore();
  return client;
}

/** An earlier run of the app that received `tokens` from the broker (and wrote them down). */
async function ranAndHeld(key, cache, tokens, clock = () => NOW) {
  const client = await app(key, cache, clock);
  for (const token of tokens) await client.acceptLease(token);
}

test("a lease verifies with the pinned key and says what the broker signed", async () => {
  const key = await newKey();
  const lease = await pinned(key).verify(await signLease(key), LICENSE);
  assert.deepEqual([lease.licenseId, lease.seq, lease.entitled, lease.features], [LICENSE, 3, true, ["pro"]]);
  assert.equal(lease.expiresAt, NOW / 1000 + 600);
  assert.equal(lease.kid, key.kid);
});

test("a tampered lease is rejected", async () => {
  const key = await newKey();
  const unpaid = await signLease(key, { entitled: false });
  await assert.rejects(pinned(key).verify(tamper(unpaid, { entitled: true }), LICENSE), /does not verify/);
  await assert.rejects(pinned(key).verify(tamper(unpaid, { exp: NOW / 1000 + 1e9 }), LICENSE), InvalidLeaseError);
  const [h, p, s] = unpaid.split(".");
  await assert.rejects(pinned(key).verify(`${h}.${p}.${s.slice(0, -4)}AAAA`, LICENSE), /does not verify/);
});

test("a lease signed by another key, or claiming a pinned kid, or not EdDSA, is rejected", async () => {
  const key = await newKey();
  const other = await newKey();
  await assert.rejects(pinned(key).verify(await signLease(other), LICENSE), /does not pin/);
  const spoofed = await signLease({ ...other, kid: key.kid });
  await assert.rejects(pinned(key).verify(spoofed, LICENSE), /does not verify/);
  const hs256 = await new SignJWT({ sub: LICENSE, seq: 9, entitled: true }).setProtectedHeader({ alg: "HS256" })
    .setIssuedAt().setExpirationTime("1h").sign(new Uint8Array(32));
  await assert.rejects(pinned(key).verify(hs256, LICENSE), /algorithm HS256/);
});

test("an expired lease is rejected and stops entitling while the app runs", async () => {
  const key = await newKey();
  const token = await signLease(key, { ttl: 600 });
  await assert.rejects(pinned(key, () => NOW + 600_000).verify(token, LICENSE), /expired/);
  const cache = join(await tmp(), "lease");
  await ranAndHeld(key, cache, [token]);
  let now = NOW;
  const client = await app(key, cache, () => now);
  assert.equal(client.isEntitled(), true);
  now = NOW + 600_000; // offline, the lease runs out
  assert.equal(client.isEntitled(), false);
});

test("a lease for another license is refused", async () => {
  const key = await newKey();
  const theirs = await signLease(key, { sub: "lic_someone_else" });
  await assert.rejects(pinned(key).verify(theirs, LICENSE), /another license/);
  const cache = join(await tmp(), "lease");
  await ranAndHeld(key, cache, [await signLease(key)]);
  await new LeaseCache(cache).save(theirs);
  const client = await app(key, cache);
  assert.equal(client.lease, null);
  assert.equal(client.isEntitled(), false);
});

test("an app started offline is entitled by a valid cached lease and locked without one", async () => {
  const key = await newKey();
  const dir = await tmp();
  await ranAndHeld(key, join(dir, "good"), [await signLease(key)]);
  assert.equal((await app(key, join(dir, "good"))).isEntitled(), true);
  assert.equal((await app(key, join(dir, "missing"))).isEntitled(), false);
  await ranAndHeld(key, join(dir, "garbage"), [await signLease(key)]);
  await writeFile(join(dir, "garbage"), "\xff not a lease");
  assert.equal((await app(key, join(dir, "garbage"))).isEntitled(), false);
  await ranAndHeld(key, join(dir, "unpaid"), [await signLease(key, { entitled: false })]);
  assert.equal((await app(key, join(dir, "unpaid"))).isEntitled(), false);
  // Without a verifier nothing on disk is trusted.
  const unverified = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache: join(dir, "good") });
  await unverified.restore();
  assert.equal(unverified.isEntitled(), false);
});

test("accepted leases are cached and an older state never replaces a newer one", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  const client = await app(key, cache);
  const seen = [];
  const rejected = [];
  client.on("lease", (lease) => seen.push(lease.seq));
  client.on("rejected", (error) => rejected.push(error));
  const five = await signLease(key, { seq: 5, entitled: false });
  assert.notEqual(await client.acceptLease(five), null);
  assert.equal(await client.acceptLease(await signLease(key, { seq: 4, entitled: true })), null); // replayed
  assert.equal(await client.acceptLease(await signLease(key, { seq: 9, sub: "lic_other" })), null);
  assert.deepEqual([seen, client.isEntitled(), client.rejectedLeases, rejected.length], [[5], false, 1, 1]);
  assert.equal(await new LeaseCache(cache).load(), five);
  await client.acceptLease(await signLease(key, { seq: 6, entitled: true }));
  assert.deepEqual([seen, client.isEntitled()], [[5, 6], true]);
});

// --- pinned keys --------------------------------------------------------------------------------

test("the verifier takes exactly what `keys public` prints: comment lines and every block", async () => {
  const [key, old] = [await newKey(), await newKey()];
  const verifier = new LeaseVerifier({ publicKeys: keysPublicOutput(key, old), clock: () => NOW }); // the file's text
  assert.deepEqual(verifier.kids, new Set([key.kid, old.kid]));
  assert.equal((await verifier.verify(await signLease(key), LICENSE)).entitled, true);
  assert.equal((await verifier.verify(await signLease(old), LICENSE)).entitled, true);
  // In a list, with Windows line ends, with literal "\n" (an environment variable), as a JWKS.
  const crlf = keysPublicOutput(key).replaceAll("\n", "\r\n");
  assert.deepEqual(new LeaseVerifier({ publicKeys: [crlf, old.pem.replaceAll("\n", "\\n")] }).kids, verifier.kids);
  assert.deepEqual(new LeaseVerifier({ jwks: { keys: [key.jwk] } }).kids, new Set([key.kid]));
});

test("a key the client cannot use is an error at construction", async () => {
  const key = await newKey();
  const spki = (type, options) => generateKeyPairSync(type, options).publicKey.export({ type: "spki", format: "pem" });
  const ed = generateKeyPairSync("ed25519");
  const cases = [
    ["", /no PEM public key/],
    ["# kid abc\n", /no PEM public key/],
    ["not a key", /no PEM public key/],
    ["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", /cannot be read/],
    [ed.privateKey.export({ type: "pkcs8", format: "pem" }) + ed.publicKey.export({ type: "spki", format: "pem" }), /private key/],
    [spki("rsa", { modulusLength: 2048 }), /Ed25519/],
    [spki("x25519"), /Ed25519/],
    ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", /CERTIFICATE block/],
  ];
  for (const [text, error] of cases) {
    assert.throws(() => new LeaseVerifier({ publicKeys: [text] }), (e) => e instanceof InvalidKeyError && error.test(e.message), String(error));
    // One bad key among good ones is still an error: it would never verify anything.
    assert.throws(() => new LeaseVerifier({ publicKeys: [key.pem, text] }), InvalidKeyError);
  }
  assert.throws(() => new LeaseVerifier({ jwks: { keys: [] } }), /non-empty/);
  assert.throws(() => new LeaseVerifier({ jwks: { keys: [{ kty: "EC", crv: "P-256", x: "a", y: "b" }] } }), /only Ed25519/);
  assert.throws(() => new LeaseVerifier({ jwks: { keys: [{ kty: "OKP", crv: "Ed25519", x: "short" }] } }), /cannot be read/);
});

test("a verifier without a pinned key verifies nothing, and the broker's JWKS is not an option", async () => {
  const key = await newKey();
  for (const unpinned of [new LeaseVerifier(), new LeaseVerifier({ publicKeys: [] }), LeaseVerifier.forServer("https://licenses.example.com")]) {
    assert.equal(unpinned.kids.size, 0);
    await assert.rejects(unpinned.verify(await signLease(key), LICENSE), /pins no lease key/);
    assert.equal(new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", verifier: unpinned }).trust, "unverified");
  }
  assert.throws(() => new LeaseVerifier({ publicKeys: [key.pem], jwksUrl: "https://licenses.example.com/.well-known/jwks.json" }), /jwksUrl/);
});

test("forServer pins the keys given and nothing else", async () => {
  const [key, other] = [await newKey(), await newKey()];
  const verifier = LeaseVerifier.forServer("https://licenses.example.com", { publicKeys: [key.pem], clock: () => NOW });
  assert.deepEqual(verifier.kids, new Set([key.kid]));
  await assert.rejects(verifier.verify(await signLease(other), LICENSE), /does not pin/);
});

test("a client without a verifier says so: a process warning and its trust", async () => {
  const warnings = [];
  const onWarning = (warning) => warnings.push(warning);
  process.on("warning", onWarning);
  try {
    const client = new LicenseClient({ baseUrl: "https://licenses.example.com", licenseId: LICENSE, token: "t" });
    assert.equal(client.trust, "unverified");
    await new Promise((resolve) => setImmediate(resolve)); // process warnings are emitted on the next tick
  } finally {
    process.off("warning", onWarning);
  }
  const warning = warnings.find((w) => w.code === "LICENSE_BROKER_UNVERIFIED");
  assert.match(warning?.message ?? "", /no pinned lease key.*https:\/\/licenses\.example\.com.*never unlocks offline/);
  assert.equal(new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", verifier: pinned(await newKey()) }).trust, "pinned");
});

// --- the clock and the watermark ----------------------------------------------------------------

test("a lease issued in the future beyond the skew is refused", async () => {
  const key = await newKey();
  assert.equal((await pinned(key).verify(await signLease(key, { iat: NOW / 1000 + 299 }), LICENSE)).entitled, true);
  await assert.rejects(pinned(key).verify(await signLease(key, { iat: NOW / 1000 + 301 }), LICENSE), /issued in the future/);
  const strict = new LeaseVerifier({ publicKeys: [key.pem], clock: () => NOW, maxSkewMs: 10_000 });
  await assert.rejects(strict.verify(await signLease(key, { iat: NOW / 1000 + 11 }), LICENSE), /the clock is behind/);
});

test("turning the clock back below a cached lease's issue time locks", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  await ranAndHeld(key, cache, [await signLease(key, { ttl: 30 * 86400 })]);
  assert.equal((await app(key, cache)).isEntitled(), true);
  assert.equal((await app(key, cache, () => NOW - 365 * 86400_000)).isEntitled(), false);
});

test("turning the clock back does not revive an expired cached lease", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  await ranAndHeld(key, cache, [await signLease(key, { ttl: 600 })]);
  assert.equal((await app(key, cache, () => NOW + 610_000)).isEntitled(), false); // it notes the time it saw
  const rolledBack = await app(key, cache, () => NOW + 100_000);
  assert.deepEqual([rolledBack.isEntitled(), rolledBack.lease], [false, null]);
  assert.equal((await app(key, cache, () => NOW + 560_000)).isEntitled(), false); // back within the skew
});

test("the clock turned back while the app runs does not stop a lease from expiring", async () => {
  const key = await newKey();
  let now = NOW;
  const client = await app(key, join(await tmp(), "lease"), () => now);
  await client.acceptLease(await signLease(key, { ttl: 600 }));
  now = NOW + 500_000;
  assert.equal(client.isEntitled(), true); // (it notes the time it sees)
  now = NOW + 10_000; // turned back by more than the skew
  assert.equal(client.isEntitled(), false);
});

test("a cached lease older than the watermark is refused", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  await ranAndHeld(key, cache, [await signLease(key, { seq: 5, ttl: 30 * 86400 })]);
  const backup = await readFile(cache); // the user keeps a copy of the paid lease
  await ranAndHeld(key, cache, [await signLease(key, { seq: 6, entitled: false, iat: NOW / 1000 + 60 })], () => NOW + 60_000);
  assert.equal((await app(key, cache, () => NOW + 120_000)).isEntitled(), false);
  await writeFile(cache, backup); // ... and copies it back, offline
  const restarted = await app(key, cache, () => NOW + 120_000);
  assert.deepEqual([restarted.isEntitled(), restarted.lease], [false, null]);
});

test("deleting the watermark does not revive a cached lease", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  await ranAndHeld(key, cache, [await signLease(key)]);
  assert.equal(JSON.parse(await readFile(`${cache}.watermark`, "utf8")).seq, 3); // a file of its own
  await rm(`${cache}.watermark`);
  assert.equal((await app(key, cache)).isEntitled(), false);
  await writeFile(`${cache}.watermark`, "{not json");
  assert.equal((await app(key, cache)).isEntitled(), false);
});

test("a replayed older lease is refused even once the one held has expired", async () => {
  const key = await newKey();
  let now = NOW;
  const client = await app(key, join(await tmp(), "lease"), () => now);
  const paid = await signLease(key, { seq: 5, ttl: 86400 });
  assert.notEqual(await client.acceptLease(paid), null);
  now = NOW + 60_000;
  assert.notEqual(await client.acceptLease(await signLease(key, { seq: 6, entitled: false, iat: NOW / 1000 + 60 })), null);
  now = NOW + 1_000_000; // the refund's lease has expired; the paid one has not
  assert.equal(await client.acceptLease(paid), null); // replayed (by a fake server holding a copy)
  assert.deepEqual([client.isEntitled(), client.rejectedLeases], [false, 1]);
});

test("the broker's newer lease wins by issue time even with a lower seq", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  let now = NOW;
  const client = await app(key, cache, () => now);
  assert.notEqual(await client.acceptLease(await signLease(key, { seq: 7 })), null);
  // The broker's database was restored from a backup: its current state has seq 3 and no payment.
  now = NOW + 60_000;
  const restored = await client.acceptLease(await signLease(key, { seq: 3, entitled: false, iat: NOW / 1000 + 60 }));
  assert.deepEqual([restored?.seq, client.isEntitled()], [3, false]);
  const again = await app(key, cache, () => NOW + 61_000); // the watermark followed the broker
  assert.equal(again.lease?.seq, 3);
  assert.notEqual(await new Watermark(`${cache}.watermark`).load(), null);
});

test("a watermark left ahead by a wrong clock is reset by the broker's next lease", async () => {
  const key = await newKey();
  const cache = join(await tmp(), "lease");
  await app(key, cache, () => NOW + 365 * 86400_000); // the clock was a year ahead once, then corrected
  const client = await app(key, cache);
  assert.equal(client.isEntitled(), false); // the clock now looks turned back
  assert.notEqual(await client.acceptLease(await signLease(key)), null); // the broker's signed time says otherwise
  assert.equal(client.isEntitled(), true);
  assert.equal((await app(key, cache)).isEntitled(), true);
});

test("the same state signed a moment earlier is ignored, not rejected", async () => {
  const key = await newKey();
  const client = await app(key, join(await tmp(), "lease"), () => NOW + 5000); // two broker processes, clocks a second apart
  assert.notEqual(await client.acceptLease(await signLease(key, { seq: 4, iat: NOW / 1000 + 2 })), null);
  assert.equal(await client.acceptLease(await signLease(key, { seq: 4, iat: NOW / 1000 + 1 })), null);
  assert.deepEqual([client.rejectedLeases, client.lease.issuedAt], [0, NOW / 1000 + 2]);
  assert.notEqual(await client.acceptLease(await signLease(key, { seq: 5, entitled: false, iat: NOW / 1000 + 1 })), null); // a new state
  assert.equal(client.isEntitled(), false);
});

// --- the expiry timer, backoff ------------------------------------------------------------------

test("the expiry timer tells the app when its lease runs out, offline", async () => {
  const key = await newKey();
  const client = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", verifier: new LeaseVerifier({ publicKeys: key.pem }),
    cache: join(await tmp(), "lease"), minBackoffMs: 60_000 }); // (one failed connection, then a long wait)
  const entitlement = [];
  client.on("entitlement", (entitled) => entitlement.push([entitled, Date.now()]));
  const lease = await client.acceptLease(await signLease(key, { iat: Date.now() / 1000, ttl: 2 }));
  client.start();
  try {
    await new Promise((resolve, reject) => {
      client.once("entitlement", resolve);
      setTimeout(() => reject(new Error("no entitlement event within 5 s")), 5000).unref();
    });
  } finally {
    client.stop();
  }
  assert.deepEqual(entitlement.map(([e]) => e), [true, false]);
  const lockedAt = entitlement[1][1];
  assert.ok(lockedAt >= lease.expiresAt * 1000 && lockedAt - lease.expiresAt * 1000 < 1500, `${lockedAt} vs ${lease.expiresAt}`);
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
