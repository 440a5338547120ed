// The window only displays what the main process decided: it never sees a token or a lease, and a
// paid feature runs in the main process, which checks the lease itself (disabling the button here
// is a courtesy to the user, not the lock).
function apply(license) {
  document.body.classList.toggle("locked", !license.entitled);
  document.getElementById("badge").textContent = license.entitled ? "UNLOCKED" : "LOCKED";
  document.getElementById("pro").disabled = !license.entitled;
  const until = license.expiresAt ? ` Works offline until ${new Date(license.expiresAt).toLocaleString()}.` : "";
  const why = {
    active: "Thank you for subscribing.",
    trialing: "You are on a trial.",
    past_due: "Your last payment failed: please update your card.",
    canceled: "Your subscription has ended.",
    revoked: "This purchase was refunded.",
    none: "Buy a license to unlock.",
  }[license.status] ?? "No license found yet.";
  document.getElementById("why").textContent = `${why}${until} (${license.connection})`;
}

document.getElementById("pro").addEventListener("click", async () => {
  const answer = await window.license.use("pro-report");
  document.getElementById("result").textContent = answer.ok ? answer.result : `Not available: ${answer.reason}.`;
});
window.license.get().then(apply);
window.license.onChange(apply);
