// The window only displays what the main process decided: it never sees a token or a lease, and a
// paid feature runs in the main process, which checks the lease itself (disabling the button here
// is a courtesy to the user, not the lock). Text from the server (machine names) goes in with
// textContent only.
const $ = (id) => document.getElementById(id);

function apply(license) {
  document.body.classList.toggle("needs-key", license.screen === "key");
  document.body.classList.toggle("locked", !license.entitled);
  if (license.screen === "key") {
    $("key-why").textContent = license.released
      ? "This computer was deactivated (from another computer, or by the seller). Enter your license key to activate it again."
      : "You received it after your purchase (it looks like XXXXX-XXXXX-XXXXX-XXXXX-XXXXX).";
    return;
  }
  $("badge").textContent = license.entitled ? "UNLOCKED" : "LOCKED";
  $("pro").disabled = !license.entitled;
  const until = license.expiresAt ? ` Works offline until ${new Date(license.expiresAt).toLocaleString()}.` : "";
  const why = {
    active: "Thank you for subscribing.",
    trialing: "You are on a trial.",
    past_due: "Your last payment failed: please update your card.",
    canceled: "Your subscription has ended.",
    revoked: "This purchase was refunded.",
    none: "Buy a license to unlock.",
  }[license.status] ?? "No license found yet.";
  $("why").textContent = `${why}${until} (${license.connection})`;
}

const REFUSALS = {
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
window.license.get().then(apply);
window.license.onChange(apply);
