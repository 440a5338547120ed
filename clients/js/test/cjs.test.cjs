// The CommonJS build, as an Electron main process written with require() loads it.
const assert = require("node:assert/strict");
const { test } = require("node:test");
const { LeaseVerifier, LicenseClient, InvalidLeaseError } = require("license-broker-client");

test("require() gives the CommonJS build, and it verifies leases (jose is loaded with import())", async () => {
  assert.equal(require.resolve("license-broker-client").endsWith("dist/cjs/index.js"), true);
  const { newKey, signLease, LICENSE, NOW } = await import("./helpers.mjs");
  const key = await newKey();
  const verifier = new LeaseVerifier({ publicKeys: [key.pem], clock: () => NOW });
  assert.equal((await verifier.verifyOffline(await signLease(key), LICENSE)).entitled, true);
  await assert.rejects(verifier.verifyOffline(await signLease(key, { sub: "lic_other" }), LICENSE), InvalidLeaseError);
  assert.equal(typeof new LicenseClient({ baseUrl: "http://x", licenseId: LICENSE, token: "t" }).isEntitled, "function");
});
