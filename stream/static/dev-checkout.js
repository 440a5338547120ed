"use strict";
// Development mode's stand-in for Stripe Checkout (license_broker/dev_pages.py).
const $ = (id) => document.getElementById(id);
const sessionId = location.pathname.split("/").pop();
const base = `/dev/checkout/${encodeURIComponent(sessionId)}`;

function show(section) {
  for (const id of ["open", "working", "done"]) $(id).hidden = id !== section;
}

function done(text) {
  $("done-text").textContent = text;
  show("done");
}

function money(amount, currency) {
  return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(amount / 100);
}

async function load() {
  const response = await fetch(`${base}/session`, { cache: "no-store" });
  const session = await response.json();
  if (!response.ok) return done(session.error || `This checkout cannot be shown (${response.status}).`);
  const app = session.app_name || "The app";
  $("title").textContent = `Buy ${session.app_name || "the app"}`;
  $("what").textContent = session.mode === "subscription"
    ? `${app}: a subscription, ${money(session.amount, session.currency)} a month (price ${session.price}).`
    : `${app}: a one-time purchase, ${money(session.amount, session.currency)} (price ${session.price}).`;
  if (session.status === "paid") return done("This checkout is paid. You can close this tab.");
  if (session.status === "expired") return done("This checkout was canceled. You can close this tab.");
  show("open");
}

async function act(action) {
  show("working");
  const response = await fetch(`${base}/${action}`, {
    method: "POST", headers: { "content-type": "application/json" }, body: "{}",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) return done(body.error || `The broker answered ${response.status}.`);
  if (action === "pay") {
    location.assign(body.success_url);
  } else {
    done(`Checkout canceled. You can close this tab and return to the app.`);
  }
}

$("pay").addEventListener("click", () => act("pay"));
$("cancel").addEventListener("click", () => act("cancel"));
load().catch((error) => done(`The broker cannot be reached (${error}).`));
