// The renderer gets a narrow API, never ipcRenderer itself. (CommonJS: sandboxed preloads are.)
const { contextBridge, ipcRenderer } = require("electron");

contextBridge.exposeInMainWorld("license", {
  get: () => ipcRenderer.invoke("license:get"),
  onChange: (callback) => {
    const listener = (_event, snapshot) => callback(snapshot);
    ipcRenderer.on("license:changed", listener);
    return () => ipcRenderer.off("license:changed", listener);
  },
  // The key the user typed: the main process activates this computer with it.
  activate: (key) => ipcRenderer.invoke("license:activate", key),
  // "Limit reached": release the machine picked from the list, then activate here.
  replace: (machineId, key) => ipcRenderer.invoke("license:replace", machineId, key),
  deactivate: () => ipcRenderer.invoke("license:deactivate"),
  // Buy (Stripe Checkout in the system browser: the window unlocks by itself once paid), a trial,
  // and Stripe's Billing Portal in the browser.
  buy: () => ipcRenderer.invoke("license:buy"),
  startTrial: () => ipcRenderer.invoke("license:trial"),
  manage: () => ipcRenderer.invoke("license:manage"),
  // Asks the main process to run a paid feature; it decides, from the signed lease.
  use: (feature) => ipcRenderer.invoke("feature:use", feature),
});
