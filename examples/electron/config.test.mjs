// The example's settings (config.js): it refuses to start without a pinned key it can use, and a
// packaged build takes nothing from the environment. tests/test_node_client.py runs this file.
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { APP_ID, loadConfig, PRODUCTION_BROKER_URL } from "./config.js";

const publicPem = () => generateKeyPairSync("ed25519").publicKey.export({ type: "spki", format: "pem" });
const HOSTILE = { BROKER_URL: "http://evil.example", LICENSE_ID: "lic_someone_else", LICENSE_TOKEN: "a-token" };

async function appDir(keyFile) {
  const dir = await mkdtemp(join(tmpdir(), "lb-electron-config-"));
  if (keyFile !== undefined) await writeFile(join(dir, "public-key.pem"), keyFile);
  return dir;
}

test("the app refuses to start without its pinned key, or with one it cannot use", async () => {
  for (const packaged of [false, true]) {
    assert.throws(() => loadConfig({ packaged, env: {}, dir: "/nonexistent" }), /public-key\.pem: ENOENT.*does not start without it/s);
  }
  const cases = [
    ["", /no PEM public key.*is the file empty/], // what a failed `keys public > public-key.pem` leaves
    ["# kid abc\n", /no PEM public key/],
    [generateKeyPairSync("ed25519").privateKey.export({ type: "pkcs8", format: "pem" }), /private key/],
    [generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey.export({ type: "spki", format: "pem" }), /Ed25519/],
  ];
  for (const [text, error] of cases) {
    const dir = await appDir(text);
    assert.throws(() => loadConfig({ packaged: false, env: {}, dir }), (e) => e.message.startsWith(join(dir, "public-key.pem")) && error.test(e.message));
  }
});

test("it pins exactly what `keys public` writes", async () => {
  const pem = publicPem();
  const dir = await appDir(`# kid xyz (signs)\n${pem}# kid abc (published only)\n${publicPem()}`);
  const config = loadConfig({ packaged: false, env: {}, dir });
  assert.equal(config.publicKeys.length, 1);
  assert.equal(config.publicKeys[0].split("BEGIN PUBLIC KEY").length, 3); // both blocks, pinned
});

test("a packaged build takes its broker from the build, never from the environment", async () => {
  const dir = await appDir(publicPem());
  const packaged = loadConfig({ packaged: true, env: HOSTILE, dir });
  assert.deepEqual([packaged.baseUrl, packaged.appId], [PRODUCTION_BROKER_URL, APP_ID]);
  assert.ok(PRODUCTION_BROKER_URL.startsWith("https://"));
  const development = loadConfig({ packaged: false, env: HOSTILE, dir });
  assert.deepEqual([development.baseUrl, development.appId], [HOSTILE.BROKER_URL, APP_ID]); // the license: from the key only
  assert.deepEqual(Object.keys(development).sort(), ["appId", "baseUrl", "publicKeys"]);
  assert.equal(loadConfig({ packaged: false, env: {}, dir }).baseUrl, "http://127.0.0.1:8000");
});

test("main.js takes its settings from loadConfig only, and exits when it refuses", async () => {
  // Electron is not installed for the tests: this reads main.js, so that it cannot go back to
  // reading BROKER_URL itself or to starting without a key.
  const main = await readFile(new URL("./main.js", import.meta.url), "utf8");
  assert.match(main, /loadConfig\(\{ packaged: app\.isPackaged, env: process\.env, dir: import\.meta\.dirname \}\)/);
  assert.match(main, /catch \(error\) \{[^}]*dialog\.showErrorBox\([^}]*app\.exit\(1\);\s*return;/s);
  assert.doesNotMatch(main, /process\.env\.[A-Z_]+/);
  assert.doesNotMatch(main, /public-key\.pem|existsSync/);
});
