// Electron's main process: holds the license (one client for every window), answers the windows
// over IPC, and runs the paid features. The license logic itself is in license.js, the settings
// in config.js.
import path from "node:path";
import { app, BrowserWindow, dialog, ipcMain, shell } from "electron";
import { loadConfig } from "./config.js";
import { startLicense } from "./license.js";

// The paid features: they run here, never in a window, and only through license.run().
const PAID_FEATURES = {
  "pro-report": () => `A paid report, made by the main process at ${new Date().toLocaleTimeString()}.`,
};

function sendToWindows(channel, payload) {
  for (const window of BrowserWindow.getAllWindows()) window.webContents.send(channel, payload);
}

function openWindow() {
  const window = new BrowserWindow({
    width: 560,
    height: 440,
    webPreferences: {
      preload: path.join(import.meta.dirname, "preload.cjs"),
      contextIsolation: true,
      sandbox: true,
      nodeIntegration: false,
    },
  });
  window.loadFile(path.join(import.meta.dirname, "index.html"));
}

// What a window may send: strings of a sane length, nothing else.
const text = (value, longest = 200) => (typeof value === "string" && value.length <= longest ? value : "");

app.whenReady().then(async () => {
  let config;
  try {
    config = loadConfig({ packaged: app.isPackaged, env: process.env, dir: import.meta.dirname });
  } catch (error) {
    // No pinned key, or one the client cannot use: refuse to start, and say why.
    dialog.showErrorBox("Cannot start", error.message);
    app.exit(1);
    return;
  }
  const license = await startLicense({
    baseUrl: config.baseUrl,
    appId: config.appId,
    publicKeys: config.publicKeys,
    // The last lease, and beside it the watermark and this machine's activation (its token, 0600).
    cachePath: path.join(app.getPath("userData"), "license-lease"),
    send: sendToWindows,
    // Checkout and the Billing Portal open in the system browser (never in a window of the app):
    // the buyer's card details go to Stripe in the browser they trust.
    openUrl: (url) => shell.openExternal(url),
  });
  ipcMain.handle("license:get", () => license.snapshot()); // a window that opens later asks once
  ipcMain.handle("license:activate", (_event, key) => license.activate(text(key)));
  ipcMain.handle("license:replace", (_event, machineId, key) => license.replace(text(machineId), text(key)));
  ipcMain.handle("license:deactivate", () => license.deactivate());
  ipcMain.handle("license:buy", () => license.buy()); // the broker's default price (the first of STRIPE_PRICES)
  ipcMain.handle("license:trial", () => license.startTrial());
  ipcMain.handle("license:manage", () => license.manage());
  ipcMain.handle("feature:use", (_event, name) => {
    const work = Object.hasOwn(PAID_FEATURES, name) ? PAID_FEATURES[name] : null;
    return work === null ? { ok: false, reason: "unknown feature" } : license.run(name, work);
  });
  app.on("before-quit", () => license.stop());
  openWindow();
  app.on("activate", () => BrowserWindow.getAllWindows().length === 0 && openWindow());
});

app.on("window-all-closed", () => process.platform !== "darwin" && app.quit());
