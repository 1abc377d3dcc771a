// The ehrbridge console's only script: live numbers on the sites page and dead-letter
// replay through the operator API (POST /api/dlq/replay) with the session's CSRF token.
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function lookup(data, path) {
  return path.split(".").reduce((node, part) => (node == null ? undefined : node[part]), data);
}

function refreshNumbers(root) {
  const url = root.dataset.refresh;
  const every = Number(root.dataset.every || "5") * 1000;
  async function tick() {
    try {
      const answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!answer.ok) return;
      const data = await answer.json();
      root.querySelectorAll("[data-key]").forEach((el) => {
        const value = lookup(data, el.dataset.key);
        if (value !== undefined) el.textContent = value === null ? "—" : String(value);
      });
      root.querySelectorAll("[data-silent-key]").forEach((el) => {
        el.classList.toggle("silent", lookup(data, el.dataset.silentKey) === true);
      });
    } catch (error) {
      // A missed refresh keeps the last numbers; the next tick tries again.
    }
  }
  setInterval(tick, every);
}

function selectedOffsets() {
  return Array.from(document.querySelectorAll('#dead-letters input[name="offset"]:checked'))
    .map((box) => Number(box.value));
}

async function replay(body, status) {
  status.textContent = "Working…";
  const answer = await fetch("/api/dlq/replay", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify(body),
  });
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    status.textContent = "Refused: " + (data.detail && typeof data.detail === "string" ? data.detail : answer.status);
    return false;
  }
  const verb = body.dry_run ? "Would replay" : "Replayed";
  status.textContent = verb + " " + data.replayed.length + " dead letter(s): " + data.replayed.join(", ");
  return !body.dry_run;
}

function replayBody(kind, button, filter) {
  if (kind === "one") return { offsets: [Number(button.dataset.offset)] };
  if (kind === "selected") return { offsets: selectedOffsets() };
  const body = Object.assign({}, filter);
  if (!body.reason && !body.since && !body.until) body.all = true;
  if (kind === "preview") body.dry_run = true;
  return body;
}

function wireReplay(actions) {
  const status = document.getElementById("replay-status");
  const filter = JSON.parse(actions.dataset.replayFilter || "{}");
  document.querySelectorAll("[data-replay]").forEach((button) => {
    button.addEventListener("click", async () => {
      const body = replayBody(button.dataset.replay, button, filter);
      if (body.offsets && body.offsets.length === 0) {
        status.textContent = "Select dead letters first.";
        return;
      }
      if (await replay(body, status)) setTimeout(() => window.location.reload(), 1500);
    });
  });
  const all = document.querySelector("[data-select-all]");
  if (all) {
    all.addEventListener("change", () => {
      document.querySelectorAll('#dead-letters input[name="offset"]').forEach((box) => { box.checked = all.checked; });
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refreshNumbers);
  const actions = document.querySelector("[data-replay-filter]");
  if (actions) wireReplay(actions);
});
