// Where the app's license settings come from. No Electron here (the caller says whether the build
// is packaged), so the repository's tests run this very file (tests/test_node_client.py).
//
// - The broker's public lease key is a file shipped with the app. Without it, or with a key the
//   client cannot use, the app does not start: an app that cannot verify leases would either stay
//   locked for paying users or, worse, be tempted to trust whatever a server says.
// - A packaged build reads nothing from the environment: a BROKER_URL set by whoever starts the
//   app would point it at a server of their choosing. Only a development run (`npm start` from
//   the source) takes BROKER_URL from the environment.
// - The license itself comes from the key the buyer types (license.js): nothing to configure.
import { readFileSync } from "node:fs";
import path from "node:path";
import { LeaseVerifier } from "license-broker-client";

/** Your broker, for packaged builds. */
export const PRODUCTION_BROKER_URL = "https://licenses.example.com";
/**
 * Your app's own salt for the machine fingerprint (the client hashes the OS machine id with it):
 * fixed for the life of the app, or every machine becomes a new one.
 */
export const APP_ID = "com.example.license-broker-demo";
const DEVELOPMENT_BROKER_URL = "http://127.0.0.1:8000";
export const KEY_FILE = "public-key.pem";

/**
 * @param {object} options
 * @param {boolean} options.packaged  Electron's app.isPackaged
 * @param {Record<string, string | undefined>} options.env  process.env (ignored when packaged)
 * @param {string} options.dir  where public-key.pem is (the app's own directory)
 * @returns {{ baseUrl: string, appId: string, publicKeys: string[] }}
 */
export function loadConfig({ packaged, env, dir }) {
  const keyFile = path.join(dir, KEY_FILE);
  let text;
  try {
    text = readFileSync(keyFile, "utf8");
  } catch (error) {
    throw new Error(
      `${keyFile}: ${error.code ?? error.message}. The app pins the broker's public lease key from this file ` +
        `(\`license-broker keys public > ${KEY_FILE}\`) and does not start without it.`,
    );
  }
  try {
    new LeaseVerifier({ publicKeys: text }); // the same check the client makes: fail here, at start-up
  } catch (error) {
    throw new Error(`${keyFile}: ${error.message}`);
  }
  const baseUrl = packaged ? PRODUCTION_BROKER_URL : (env.BROKER_URL ?? DEVELOPMENT_BROKER_URL);
  if (packaged && !baseUrl.startsWith("https://")) throw new Error(`a packaged build talks to its broker over https, not ${baseUrl}`);
  return { baseUrl, appId: APP_ID, publicKeys: [text] };
}
