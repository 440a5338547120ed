// A fake broker (its own key in its JWKS, an entitled ten-year lease it signed) against the client:
// with the real key pinned it unlocks nothing; without a pinned key the client follows the live
// state only, says so, and never unlocks offline.
import assert from "node:assert/strict";
import { access, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { LeaseVerifier, LicenseClient } from "license-broker-client";
import { fakeBroker, newKey, until } from "./helpers.mjs";

const OFFLINE = "http://127.0.0.1:9";
const LICENSE = "lic_fake_test";
const exists = (path) => access(path).then(() => true, () => false);

test("a fake broker serving its own JWKS cannot unlock a client that pins the real key", async () => {
  const real = await newKey();
  const fake = await fakeBroker(LICENSE);
  const cache = join(await mkdtemp(join(tmpdir(), "lb-fake-")), "lease");
  // As the 0.1 docs wrote it: forServer(<the broker's address>, { publicKeys: [<the pinned key>] }).
  const verifier = LeaseVerifier.forServer(fake.url, { publicKeys: [real.pem] });
  const client = new LicenseClient({ baseUrl: fake.url, licenseId: LICENSE, token: "any-token", verifier, cache });
  const rejected = [];
  client.on("rejected", (error) => rejected.push(error));
  client.start();
  try {
    await until(() => rejected.length > 0 || client.isEntitled(), "the fake broker's lease");
    assert.equal(client.state?.entitled, true); // it did serve its state
    assert.deepEqual([client.isEntitled(), client.lease, client.rejectedLeases], [false, null, 1]);
    assert.match(rejected[0].message, /does not pin/);
    assert.equal(await client.acceptLease(fake.lease), null); // GET /api/licenses/{id}'s lease: the same
  } finally {
    client.stop();
    await fake.close();
  }
  assert.ok(!fake.requests.includes("/.well-known/jwks.json"), "never asked: nothing it serves is trusted");
  assert.ok(fake.requests.includes(`/api/licenses/${LICENSE}/events`));
  assert.equal(await exists(cache), false); // nothing cached
  const restarted = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache, verifier: new LeaseVerifier({ publicKeys: real.pem }) });
  await restarted.restore();
  assert.equal(restarted.isEntitled(), false);
});

for (const how of ["no verifier", "forServer(url), no key"]) {
test(`a client with no pinned key (${how}) follows the live state only, says so, and never unlocks offline`, async () => {
  const fake = await fakeBroker(LICENSE);
  const cache = join(await mkdtemp(join(tmpdir(), "lb-fake-")), "lease");
  const warnings = [];
  const onWarning = (warning) => warnings.push(warning);
  process.on("warning", onWarning);
  const verifier = how === "no verifier" ? undefined : LeaseVerifier.forServer(fake.url); // 0.1 read the JWKS then
  const client = new LicenseClient({ baseUrl: fake.url, licenseId: LICENSE, token: "any-token", cache, verifier });
  const entitlement = [];
  client.on("entitlement", (entitled) => entitlement.push(entitled));
  client.start();
  try {
    await until(() => client.state !== null, "the fake broker's state");
    // Online it follows the (unsigned, here fake) live state: that is all an unpinned client can do.
    assert.deepEqual([client.trust, client.isEntitled(), entitlement, client.lease], ["unverified", true, [true], null]);
    assert.equal(await client.acceptLease(fake.lease), null);
  } finally {
    client.stop();
    process.off("warning", onWarning);
    await fake.close();
  }
  assert.ok(warnings.some((w) => w.code === "LICENSE_BROKER_UNVERIFIED" && /never unlocks offline/.test(w.message)));
  assert.ok(!fake.requests.includes("/.well-known/jwks.json"));
  assert.deepEqual([await exists(cache), await exists(`${cache}.watermark`)], [false, false]);
  const restarted = new LicenseClient({ baseUrl: OFFLINE, licenseId: LICENSE, token: "t", cache, verifier });
  await restarted.restore();
  assert.equal(restarted.isEntitled(), false);
});
}
