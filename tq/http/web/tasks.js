// The task list (filters, paging, bulk actions, purge) and the page of one task.

import {
  API,
  STATES,
  CANCELLABLE,
  RETRYABLE,
  REPRIORITISABLE,
  state,
  refreshSoon,
  h,
  append,
  table,
  stateLabel,
  when,
  taskLink,
  pretty,
  say,
  api,
  confirmAction,
} from "./lib.js";

// -- task list ------------------------------------------------------------------

const BULK_MAX = 5000; // tasks a bulk action collects at most
const PAGE = 50;
const FILTERS = ["state", "queue", "type", "search", "since", "until", "order"];

function toEpoch(local) {
  if (!local) return "";
  const t = new Date(local).getTime();
  return Number.isFinite(t) ? String(t / 1000) : "";
}

export function listView(params) {
  const filters = Object.fromEntries(FILTERS.map((f) => [f, params.get(f) || ""]));
  const cursor = params.get("cursor") || "";
  const status = h("div", { class: "status-line" });
  const body = h("div", {}, h("p", {}, "Loading…"));
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  const field = (name, label, input) =>
    h("div", { class: "field" }, h("label", { for: `f-${name}` }, label), input);
  const form = h(
    "form",
    { class: "filters", role: "search", onsubmit: applyFilters },
    field(
      "state",
      "State",
      h(
        "select",
        { id: "f-state", name: "state" },
        h("option", { value: "" }, "any"),
        STATES.map((s) => h("option", { value: s, selected: filters.state === s }, s)),
      ),
    ),
    field("queue", "Queue", h("input", { id: "f-queue", name: "queue", value: filters.queue, autocomplete: "off" })),
    field("type", "Type", h("input", { id: "f-type", name: "type", value: filters.type, autocomplete: "off" })),
    field(
      "search",
      "Text in error or payload",
      h("input", { id: "f-search", name: "search", type: "search", value: filters.search, maxlength: 200 }),
    ),
    field("since", "Created from", h("input", { id: "f-since", name: "since", type: "datetime-local", value: localInput(filters.since) })),
    field("until", "Created until", h("input", { id: "f-until", name: "until", type: "datetime-local", value: localInput(filters.until) })),
    field(
      "order",
      "Order",
      h(
        "select",
        { id: "f-order", name: "order" },
        h("option", { value: "newest", selected: filters.order !== "oldest" }, "newest first"),
        h("option", { value: "oldest", selected: filters.order === "oldest" }, "oldest first"),
      ),
    ),
    h("div", { class: "field buttons" }, h("button", { type: "submit" }, "Apply filters"), h("a", { href: "#/tasks" }, "Clear")),
  );
  const actions = h("div", { class: "actions" });
  if (state.session.may.cancel) actions.append(h("button", { type: "button", class: "danger", onclick: () => bulk("cancel") }, "Cancel all matching…"));
  if (state.session.may.retry) actions.append(h("button", { type: "button", onclick: () => bulk("retry") }, "Retry all matching…"));
  if (state.session.may.purge) actions.append(h("button", { type: "button", class: "danger", onclick: purge }, "Purge finished tasks…"));
  const node = h(
    "section",
    { "aria-labelledby": "list-title" },
    h("h1", { id: "list-title" }, "Tasks"),
    form,
    actions,
    status,
    body,
    pager,
  );

  function query(extra = {}) {
    const q = { limit: PAGE, order: filters.order || "newest", ...extra };
    for (const f of ["state", "queue", "type", "search"]) if (filters[f]) q[f] = filters[f];
    if (filters.since) q.since = filters.since;
    if (filters.until) q.until = filters.until;
    return q;
  }

  function applyFilters(event) {
    event.preventDefault();
    const data = new FormData(form);
    const next = new URLSearchParams();
    for (const f of FILTERS) {
      let value = (data.get(f) || "").trim();
      if (f === "since" || f === "until") value = toEpoch(value);
      if (value && !(f === "order" && value === "newest")) next.set(f, value);
    }
    location.hash = `#/tasks${next.toString() ? `?${next}` : ""}`;
  }

  async function refresh() {
    let page;
    try {
      page = await api(`${API}/tasks`, { params: query(cursor ? { cursor } : {}) });
    } catch (error) {
      say(body, `Cannot list tasks: ${error.message}`, "error");
      return;
    }
    const rows = page.tasks.map((t) => [
      taskLink(t.id),
      t.type,
      t.queue,
      stateLabel(t.state),
      String(t.priority),
      `${t.attempts} / ${t.max_retries + 1}`,
      when(t.created_at),
      t.error ? `${t.error.type}: ${t.error.message}` : "",
    ]);
    body.replaceChildren(
      table("Tasks", ["Task", "Type", "Queue", "State", "Priority", "Attempts", "Created", "Error"], rows, "No task matches."),
    );
    const links = [];
    if (cursor) links.push(h("a", { href: pageHash("") }, "First page"));
    if (page.next_cursor) links.push(h("a", { href: pageHash(page.next_cursor), rel: "next" }, "Next page"));
    pager.replaceChildren(...links);
    if ((filters.search || filters.since || filters.until) && page.next_cursor && page.tasks.length < PAGE) {
      say(status, "Searched the first 10,000 tasks from here: follow Next page to search on.");
    }
  }

  function pageHash(next) {
    const p = new URLSearchParams();
    for (const f of FILTERS) if (filters[f]) p.set(f, filters[f]);
    if (next) p.set("cursor", next);
    return `#/tasks${p.toString() ? `?${p}` : ""}`;
  }

  async function collect(states) {
    const ids = [];
    let next = "";
    for (let calls = 0; calls < 100 && ids.length < BULK_MAX; calls++) {
      const page = await api(`${API}/tasks`, { params: query({ limit: 500, order: "oldest", ...(next ? { cursor: next } : {}) }) });
      for (const t of page.tasks) if (states.has(t.state) && ids.length < BULK_MAX) ids.push(t.id);
      next = page.next_cursor;
      if (!next) return { ids, complete: true };
    }
    return { ids, complete: false };
  }

  async function bulk(kind) {
    const states = kind === "cancel" ? CANCELLABLE : RETRYABLE;
    say(status, "Counting the matching tasks…");
    let found;
    try {
      found = await collect(states);
    } catch (error) {
      say(status, `Cannot list the matching tasks: ${error.message}`, "error");
      return;
    }
    if (!found.ids.length) {
      say(status, `No matching task can be ${kind === "cancel" ? "cancelled" : "retried"}.`);
      return;
    }
    const more = found.complete ? "" : ` (the first ${found.ids.length}; run it again for the rest)`;
    const verb = kind === "cancel" ? "Cancel" : "Retry";
    if (!(await confirmAction(`${verb} ${found.ids.length} matching task(s)${more}?`))) {
      say(status, "Nothing was changed.");
      return;
    }
    let done = 0;
    let refused = 0;
    const queue = [...found.ids];
    async function run() {
      while (queue.length) {
        const id = queue.shift();
        try {
          if (kind === "cancel") await api(`${API}/tasks/${encodeURIComponent(id)}`, { method: "DELETE" });
          else await api(`${API}/tasks/${encodeURIComponent(id)}/retry`, { method: "POST" });
          done++;
        } catch {
          refused++;
        }
        if ((done + refused) % 50 === 0) say(status, `${verb}: ${done + refused} of ${found.ids.length}…`);
      }
    }
    await Promise.all([run(), run(), run(), run()]);
    say(status, `${verb}: ${done} done${refused ? `, ${refused} refused (their state changed meanwhile)` : ""}.`);
    refresh();
  }

  async function purge() {
    const open = node.querySelector("form.purge");
    if (open) {
      open.querySelector("input").focus();
      return;
    }
    const box = h("form", { class: "purge", onsubmit: (e) => e.preventDefault() });
    const checks = ["succeeded", "dead", "cancelled"].map((s) =>
      h("label", {}, h("input", { type: "checkbox", name: "states", value: s, checked: s === "succeeded" }), ` ${s}`),
    );
    const age = h("input", { id: "purge-age", type: "number", min: "0", step: "any", value: "24", required: true });
    const go = h("button", { type: "submit", class: "danger" }, "Count and purge…");
    const close = h("button", { type: "button", onclick: () => box.remove() }, "Close");
    append(box, [
      h("fieldset", {}, h("legend", {}, "Purge finished tasks in these states"), checks),
      h("div", { class: "field" }, h("label", { for: "purge-age" }, "Finished more than (hours) ago"), age),
      h("div", { class: "buttons" }, go, close),
    ]);
    box.addEventListener("submit", async () => {
      const states = [...box.querySelectorAll("input[name=states]:checked")].map((c) => c.value);
      const olderThan = Number(age.value) * 3600;
      if (!states.length || !Number.isFinite(olderThan) || olderThan < 0) {
        say(status, "Choose at least one state and a number of hours.", "error");
        return;
      }
      try {
        const dry = await api(`${API}/purge`, { method: "POST", body: { states, older_than: olderThan, dry_run: true } });
        if (!dry.matched) {
          say(status, "No finished task matches: nothing to purge.");
          return;
        }
        if (!(await confirmAction(`Delete ${dry.matched} ${states.join("/")} task(s) for good?`))) return;
        let purged = 0;
        for (let calls = 0; calls < 50; calls++) {
          const answer = await api(`${API}/purge`, { method: "POST", body: { states, older_than: olderThan, limit: 10000 } });
          purged += answer.purged;
          if (!answer.more) break;
        }
        say(status, `Purged ${purged} task(s).`);
        box.remove();
        refresh();
      } catch (error) {
        say(status, `Purge refused: ${error.message}`, "error");
      }
    });
    actions.after(box);
    box.querySelector("input").focus();
  }

  return {
    node,
    refresh,
    onEvent: (topic) => {
      if (!cursor && (topic === "tasks" || topic === "lagged")) refreshSoon(300);
    },
  };
}

function localInput(epoch) {
  if (!epoch) return "";
  const d = new Date(Number(epoch) * 1000);
  if (!Number.isFinite(d.getTime())) return "";
  const local = new Date(d.getTime() - d.getTimezoneOffset() * 60000);
  return local.toISOString().slice(0, 16);
}

// -- one task -------------------------------------------------------------------

export function taskView(id) {
  const body = h("div", {}, h("p", {}, "Loading…"));
  const status = h("div", { class: "status-line" });
  const node = h(
    "section",
    { "aria-labelledby": "task-title" },
    h("p", {}, h("a", { href: "#/tasks" }, "← All tasks")),
    h("h1", { id: "task-title" }, "Task ", h("code", {}, id)),
    status,
    body,
  );
  async function act(label, call) {
    if (!(await confirmAction(`${label} task ${id}?`))) return;
    try {
      await call();
      say(status, `${label}: done.`);
    } catch (error) {
      say(status, `${label} refused: ${error.message}`, "error");
    }
    refresh();
  }
  async function refresh() {
    let t;
    try {
      t = await api(`${API}/tasks/${encodeURIComponent(id)}`);
    } catch (error) {
      say(body, `Cannot read the task: ${error.message}`, "error");
      return;
    }
    const facts = [
      ["State", stateLabel(t.state)],
      ["Type", t.type],
      ["Queue", t.queue],
      ["Priority", String(t.priority)],
      ["Attempts", `${t.attempts} of at most ${t.max_retries + 1}`],
      ["Created", when(t.created_at)],
      ["Started", when(t.started_at)],
      ["Finished", when(t.finished_at)],
      ["Runs at", when(t.run_at)],
      ["Worker", t.worker || "—"],
      ["Timeout", `${t.timeout} s`],
      ["Idempotency key", t.idempotency_key || "—"],
    ];
    const actions = h("div", { class: "actions" });
    if (state.session.may.cancel && CANCELLABLE.has(t.state)) {
      actions.append(h("button", { type: "button", class: "danger", onclick: () => act("Cancel", () => api(`${API}/tasks/${encodeURIComponent(id)}`, { method: "DELETE" })) }, "Cancel task"));
    }
    if (state.session.may.retry && RETRYABLE.has(t.state)) {
      actions.append(h("button", { type: "button", onclick: () => act("Retry", () => api(`${API}/tasks/${encodeURIComponent(id)}/retry`, { method: "POST" })) }, "Retry task"));
    }
    if (state.session.may.set_priority && REPRIORITISABLE.has(t.state)) {
      const input = h("input", { id: "priority", type: "number", min: "0", max: "255", value: String(t.priority), required: true });
      actions.append(
        h(
          "form",
          {
            class: "inline",
            onsubmit: (e) => {
              e.preventDefault();
              act(`Set priority ${input.value} for`, () =>
                api(`${API}/tasks/${encodeURIComponent(id)}/priority`, { method: "POST", body: { priority: Number(input.value) } }),
              );
            },
          },
          h("label", { for: "priority" }, "Priority (0–255)"),
          input,
          h("button", { type: "submit" }, "Change priority"),
        ),
      );
    }
    const parts = [
      h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      actions.childElementCount ? actions : null,
      h("h2", {}, "Payload"),
      h("pre", { class: "json", tabindex: "0" }, pretty(t.payload)),
    ];
    if (t.result !== null && t.result !== undefined) parts.push(h("h2", {}, "Result"), h("pre", { class: "json", tabindex: "0" }, pretty(t.result)));
    if (t.error) {
      parts.push(
        h("h2", {}, "Error"),
        h("p", { class: "error-text" }, `${t.error.type}: ${t.error.message}`),
        t.error.traceback ? h("details", {}, h("summary", {}, "Traceback"), h("pre", { tabindex: "0" }, t.error.traceback)) : null,
      );
    }
    body.replaceChildren(...parts.filter(Boolean));
  }
  return {
    node,
    refresh,
    onEvent: (topic, data) => {
      if (topic === "lagged" || (topic === "tasks" && (data.more || data.changes.some((c) => c.id === id)))) refreshSoon(200);
    },
  };
}
