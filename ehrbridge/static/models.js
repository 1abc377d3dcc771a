// The models page's promote / demote buttons (admins only): they call the route the CLI
// calls, POST /api/models/{model}/mode, with the session's CSRF token. The route judges,
// records the decision in the audit trail and switches; this only shows its answer.
"use strict";

function modelsCsrf() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function decisionText(data, status) {
  if (status === 200) return "Done: the model is now " + data.outcome + ".";
  if (data.why_refused) return "Refused: " + data.why_refused + ".";
  const detail = data.detail;
  return "Refused (" + status + "): " + (typeof detail === "string" ? detail : JSON.stringify(detail || data));
}

async function switchMode(form, target) {
  const out = form.querySelector(".mode-status");
  const reason = form.elements.reason.value.trim();
  const override = form.elements.override ? form.elements.override.checked : false;
  const body = { mode: target, override: override };
  if (reason) body.reason = reason;
  out.textContent = "Working…";
  const answer = await fetch("/api/models/" + encodeURIComponent(form.dataset.model) + "/mode", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": modelsCsrf() },
    body: JSON.stringify(body),
  });
  const data = await answer.json().catch(() => ({}));
  out.textContent = decisionText(data, answer.status);
  if (answer.status === 200) setTimeout(() => window.location.reload(), 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form.mode-switch").forEach((form) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const button = event.submitter || form.querySelector("button[data-target]");
      switchMode(form, button.dataset.target);
    });
  });
});
