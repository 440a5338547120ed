"use strict";
// Development mode's stand-in for Stripe's Billing Portal (license_broker/dev_pages.py).
const $ = (id) => document.getElementById(id);
const licenseId = location.pathname.split("/").pop();
const base = `/dev/portal/${encodeURIComponent(licenseId)}`;

async function load() {
  const response = await fetch(`${base}/state`, { cache: "no-store" });
  const state = await response.json();
  if (!response.ok) {
    $("summary").textContent = state.error || `The broker answered ${response.status}.`;
    return;
  }
  if (state.return_url) $("return").href = state.return_url;
  const ends = state.current_period_end ? new Date(state.current_period_end).toLocaleDateString() : null;
  let summary = `License ${state.license_id}: ${state.status}.`;
  if (state.subscription && state.cancel_at_period_end) summary += ` It ends on ${ends}.`;
  else if (state.subscription && state.entitled && ends) summary += ` It renews on ${ends}.`;
  $("summary").textContent = summary;
  $("manage").hidden = !(state.subscription && state.status !== "canceled");
  $("at-period-end").disabled = Boolean(state.cancel_at_period_end);
}

async function cancel(atPeriodEnd) {
  const response = await fetch(`${base}/cancel`, {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ at_period_end: atPeriodEnd }),
  });
  const body = await response.json().catch(() => ({}));
  $("result").textContent = response.ok
    ? (atPeriodEnd ? "Your subscription will end at the end of the period." : "Your subscription is canceled.")
    : body.error || `The broker answered ${response.status}.`;
  await load();
}

$("at-period-end").addEventListener("click", () => cancel(true));
$("now").addEventListener("click", () => cancel(false));
load().catch((error) => { $("summary").textContent = `The broker cannot be reached (${error}).`; });
