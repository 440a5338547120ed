// The window only displays what the main process decided: it never sees a token or a lease, and a
// paid feature runs in the main process, which checks the lease itself (disabling the button here
// is a courtesy to the user, not the lock). Text from the server (machine names) goes in with
// textContent only.
const $ = (id) => document.getElementById(id);
let enteringKey = false; // "I have a key" was clicked: the key form instead of the three choices

function apply(license) {
  document.body.classList.toggle("needs-key", license.screen === "key");
  document.body.classList.toggle("entering-key", enteringKey || license.released);
  document.body.classList.toggle("locked", !license.entitled);
  document.body.classList.toggle("trial", license.trial !== null && license.trial !== undefined);
  document.body.classList.toggle("buying", Boolean(license.checkout));
  document.body.classList.toggle("manageable", Boolean(license.manageable));
  const expired = license.notice === "checkout_expired" ? "The checkout ended unpaid: nothing was charged. " : "";
  if (license.screen === "key") {
    $("offer-error").textContent = expired;
    $("key-why").textContent = license.released
      ? "This computer was deactivated (from another computer, or by the seller). Enter your license key to activate it again."
      : "You received it after your purchase (it looks like XXXXX-XXXXX-XXXXX-XXXXX-XXXXX).";
    return;
  }
  const left = license.trial?.daysLeft;
  $("trial-left").textContent = license.trial ? `Trial: ${left} day${left === 1 ? "" : "s"} left (until ${new Date(license.trial.endsAt).toLocaleString()}).` : "";
  $("app-error").textContent = expired;
  $("badge").textContent = license.entitled ? "UNLOCKED" : "LOCKED";
  $("pro").disabled = !license.entitled;
  const until = license.expiresAt ? ` Works offline until ${new Date(license.expiresAt).toLocaleString()}.` : "";
  const why = {
    active: "Thank you for subscribing.",
    trialing: "You are on a trial.",
    expired: "Your trial has ended: buy a license to keep using the app.",
    past_due: "Your last payment failed: please update your card.",
    canceled: "Your subscription has ended.",
    revoked: "This purchase was refunded.",
    none: license.checkout ? "Waiting for your payment." : "Buy a license to unlock.",
  }[license.status] ?? "No license found yet.";
  $("why").textContent = `${why}${until} (${license.connection})`;
}

const REFUSALS = {
  trial_used: () => "This computer has had its trial. Buy a license, or enter your key.",
  not_offered: () => "This is not offered here yet.",
  no_customer: () => "Nothing to manage yet: buy a license first.",
  already_paid: () => "This license is paid for already: use Manage subscription.",
  no_browser: (answer) => `Could not open your browser. Open this address yourself: ${answer.url}`,
  malformed_key: () => "That is not a license key: check it for a typo.",
  invalid_key: () => "This key is not valid (it may have been replaced): check your purchase email.",
  rate_limited: (answer) => `Too many attempts. Try again in ${Math.ceil(answer.retryAfter ?? 60)} s.`,
  unavailable: () => "The license server cannot be reached. Check your connection and try again.",
  machine_limit_reached: (answer) =>
    `This key is already active on ${answer.machines.length} computer(s), the most it allows. Release one to use it here:`,
};

function showRefusal(answer, key) {
  $("key-error").textContent = (REFUSALS[answer.error] ?? (() => answer.message))(answer);
  const list = $("machines");
  list.replaceChildren();
  for (const machine of answer.machines ?? []) {
    const item = document.createElement("li");
    const seen = machine.lastSeenAt ? `last seen ${new Date(machine.lastSeenAt).toLocaleString()}` : "";
    item.textContent = `${machine.name ?? "A computer"} (${machine.platform ?? "?"}) ${seen} `;
    const release = document.createElement("button");
    release.textContent = "Release it and activate here";
    release.addEventListener("click", async () => settle(await window.license.replace(machine.id, key), key));
    item.append(release);
    list.append(item);
  }
}

function settle(answer, key) {
  if (answer.ok) {
    $("key-error").textContent = "";
    $("machines").replaceChildren();
    $("key").value = "";
    return;
  }
  showRefusal(answer, key);
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value;
  $("activate").disabled = true;
  try {
    settle(await window.license.activate(key), key);
  } finally {
    $("activate").disabled = false;
  }
});
$("pro").addEventListener("click", async () => {
  const answer = await window.license.use("pro-report");
  $("result").textContent = answer.ok ? answer.result : `Not available: ${answer.reason}.`;
});
$("deactivate").addEventListener("click", () => window.license.deactivate());
$("have-key").addEventListener("click", () => {
  enteringKey = true;
  document.body.classList.add("entering-key");
  $("key").focus();
});

/** A button that asks the main process (a trial, Buy, the portal); a refusal is said in `errorId`. */
function offer(buttonId, errorId, ask) {
  $(buttonId).addEventListener("click", async () => {
    $(buttonId).disabled = true;
    try {
      const answer = await ask();
      $(errorId).textContent = answer.ok ? "" : (REFUSALS[answer.error] ?? (() => answer.message))(answer);
    } finally {
      $(buttonId).disabled = false;
    }
  });
}
offer("trial", "offer-error", () => window.license.startTrial());
offer("buy", "offer-error", () => window.license.buy());
offer("buy-now", "app-error", () => window.license.buy());
offer("manage", "app-error", () => window.license.manage());
window.license.get().then(apply);
window.license.onChange(apply);
