// Electron's main process: holds the license stream (one for every window) and answers the
// windows over IPC. The license logic itself is in license.js.
import { readFileSync, existsSync } from "node:fs";
import path from "node:path";
import { app, BrowserWindow, ipcMain } from "electron";
import { startLicense } from "./license.js";

const BROKER_URL = process.env.BROKER_URL ?? "http://127.0.0.1:8000";
const LICENSE_ID = process.env.LICENSE_ID ?? "lic_demo";
// The broker's public lease key, shipped with the app (`license-broker keys public`).
const KEY_FILE = path.join(import.meta.dirname, "public-key.pem");
const PUBLIC_KEYS = existsSync(KEY_FILE) ? [readFileSync(KEY_FILE, "utf8")] : [];

// Replace this with your web app's endpoint, authenticated with the user's session. The one here
// is the broker's development-mode endpoint (`make run`), which mints a token for anyone.
async function getToken() {
  const response = await fetch(`${BROKER_URL}/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ license_id: LICENSE_ID }),
  });
  if (!response.ok) throw new Error(`token: ${response.status}`);
  return (await response.json()).token;
}

function sendToWindows(channel, payload) {
  for (const window of BrowserWindow.getAllWindows()) window.webContents.send(channel, payload);
}

function openWindow() {
  const window = new BrowserWindow({
    width: 520,
    height: 360,
    webPreferences: {
      preload: path.join(import.meta.dirname, "preload.cjs"),
      contextIsolation: true,
      sandbox: true,
      nodeIntegration: false,
    },
  });
  window.loadFile(path.join(import.meta.dirname, "index.html"));
}

app.whenReady().then(async () => {
  const license = await startLicense({
    baseUrl: BROKER_URL,
    licenseId: LICENSE_ID,
    getToken,
    publicKeys: PUBLIC_KEYS,
    cachePath: path.join(app.getPath("userData"), "license-lease"),
    send: sendToWindows,
  });
  ipcMain.handle("license:get", () => license.snapshot()); // a window that opens later asks once
  app.on("before-quit", () => license.stop());
  openWindow();
  app.on("activate", () => BrowserWindow.getAllWindows().length === 0 && openWindow());
});

app.on("window-all-closed", () => process.platform !== "darwin" && app.quit());
