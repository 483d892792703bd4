// Workers, API keys (admin) and the audit log (admin).

import {
  API,
  refreshSoon,
  h,
  table,
  ago,
  when,
  say,
  api,
} from "./lib.js";

// -- workers, keys, audit ---------------------------------------------------------

export function workersView() {
  const body = h("div", {}, h("p", {}, "Loading…"));
  const node = h("section", { "aria-labelledby": "workers-title" }, h("h1", { id: "workers-title" }, "Workers"), body);
  async function refresh() {
    try {
      const { workers } = await api(`${API}/workers`);
      const rows = workers.map((w) => [
        w.name,
        h("code", {}, w.id),
        w.host || "—",
        String(w.pid || "—"),
        w.queues.join(", "),
        w.types === null ? "any" : w.types.join(", "),
        `${w.running} / ${w.concurrency}`,
        w.cpu === null || w.cpu === undefined ? "—" : `${Number(w.cpu).toFixed(0)} %`,
        w.memory ? `${(w.memory / 1048576).toFixed(0)} MiB` : "—",
        ago(w.heartbeat_age),
        w.connected ? "connected" : "disconnected",
      ]);
      body.replaceChildren(
        table("Workers", ["Name", "Id", "Host", "PID", "Queues", "Types", "Running / slots", "CPU", "Memory", "Last heartbeat", "Connection"], rows, "No worker is known."),
      );
    } catch (error) {
      say(body, `Cannot list workers: ${error.message}`, "error");
    }
  }
  return { node, refresh, onEvent: (topic) => topic === "workers" && refreshSoon(1000) };
}

export function keysView() {
  const body = h("div", {}, h("p", {}, "Loading…"));
  const node = h(
    "section",
    { "aria-labelledby": "keys-title" },
    h("h1", { id: "keys-title" }, "API keys"),
    h("p", {}, "Create and revoke keys with ", h("code", {}, "tq keys"), "; secrets are never shown here."),
    body,
  );
  async function refresh() {
    try {
      const { keys } = await api(`${API}/keys`);
      const rows = keys.map((k) => [h("code", {}, k.id), k.name || "—", k.role, k.queues ? k.queues.join(", ") : "all", k.state, when(k.created_at), when(k.expires_at)]);
      body.replaceChildren(table("API keys", ["Id", "Name", "Role", "Queues", "State", "Created", "Expires"], rows, "No keys."));
    } catch (error) {
      say(body, `Cannot list keys: ${error.message}`, "error");
    }
  }
  return { node, refresh };
}

export function auditView(params) {
  const before = params.get("before") || "";
  const body = h("div", {}, h("p", {}, "Loading…"));
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  const node = h("section", { "aria-labelledby": "audit-title" }, h("h1", { id: "audit-title" }, "Audit log"), body, pager);
  async function refresh() {
    try {
      const page = await api(`${API}/audit`, { params: { limit: 100, before } });
      const rows = page.entries.map((e) => [String(e.seq), when(e.at), e.actor, e.action, e.target, JSON.stringify(e.detail)]);
      body.replaceChildren(table("Audit log", ["#", "When", "Actor", "Action", "Target", "Detail"], rows, "The log is empty."));
      const links = [];
      if (before) links.push(h("a", { href: "#/audit" }, "Newest"));
      if (page.next !== null) links.push(h("a", { href: `#/audit?before=${page.next}`, rel: "next" }, "Older entries"));
      pager.replaceChildren(...links);
    } catch (error) {
      say(body, `Cannot read the audit log: ${error.message}`, "error");
    }
  }
  return { node, refresh };
}
