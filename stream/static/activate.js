"use strict";
// The /activate page (Checkout's success_url): waits live for the Checkout Session to be recorded,
// then shows the license key. No key is ever stored by the page.
const $ = (id) => document.getElementById(id);
const sessionId = new URLSearchParams(location.search).get("session_id");

function show(section) {
  for (const id of ["waiting", "ready", "problem"]) $(id).hidden = id !== section;
}

function problem(text) {
  $("problem-text").textContent = text;
  show("problem");
}

function render(license) {
  $("key").textContent = license.key;
  if (license.open_url) {
    $("open").href = license.open_url;
    $("open-row").hidden = false;
  }
  const status = $("status");
  status.dataset.entitled = String(Boolean(license.entitled));
  status.textContent = license.entitled
    ? "Payment confirmed: your license is active."
    : `Your license is not active yet (status: ${license.status}). It activates by itself once the payment completes.`;
  show("ready");
}

async function copyKey() {
  const key = $("key").textContent;
  try {
    await navigator.clipboard.writeText(key);
  } catch (error) {
    // No clipboard API (not a secure context): select the key so that Ctrl+C copies it.
    const range = document.createRange();
    range.selectNodeContents($("key"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("copied").textContent = "Selected: press Ctrl+C (⌘C) to copy.";
    return;
  }
  $("copied").textContent = "Copied to the clipboard.";
}

async function explain() {
  // The stream was refused: the JSON route says why (it answers the same checks).
  try {
    const response = await fetch(`/api/checkout-sessions/${encodeURIComponent(sessionId)}/license`, { cache: "no-store" });
    if (response.ok) { render(await response.json()); return; }
    const body = await response.json().catch(() => ({}));
    if (response.status === 404 && /keys are off/.test(body.error || "")) {
      problem("This server does not issue license keys (LICENSE_KEY_SECRET is not set).");
      return;
    }
    const why = {
      400: "This link does not name a checkout. Open the page from the link at the end of your checkout.",
      404: "This purchase is not confirmed yet. Reload this page in a minute.",
      429: "Too many attempts from your network. Wait a minute and reload this page.",
    }[response.status];
    problem(why || `The server could not show your key (${response.status}). Reload this page in a minute.`);
  } catch (error) {
    problem("The server cannot be reached. Check your connection and reload this page.");
  }
}

function follow() {
  const source = new EventSource(`/api/checkout-sessions/${encodeURIComponent(sessionId)}/events`);
  source.addEventListener("waiting", () => show("waiting"));
  source.addEventListener("license", (message) => render(JSON.parse(message.data)));
  source.addEventListener("timeout", () => {
    source.close();
    if ($("ready").hidden) problem("Your payment is not confirmed yet. Reload this page in a few minutes.");
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) explain();
  };
}

$("copy").addEventListener("click", copyKey);
if (!sessionId) {
  // Also where the Billing Portal's return link leads by default (PORTAL_RETURN_URL).
  problem("You can close this tab and return to the app. This page shows your license key after a purchase: " +
    "open it from the link at the end of your checkout.");
} else {
  follow();
}
