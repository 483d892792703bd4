// The tq dashboard: one page, plain ES module, no framework, no build step.
//
// Data and actions go through the broker's REST API (/api/v1) with the session
// cookie; state-changing requests carry the CSRF token from GET /ui/session.
// Live updates come from GET /api/v1/events (server-sent events).
//
// Safety rule: everything a remote party chose (task types, queues, payloads,
// errors, worker names, key names) is written with textContent (the h() helper
// below turns strings into text nodes); nothing is ever assigned to innerHTML.

const API = "/api/v1";
const STATES = ["pending", "scheduled", "blocked", "running", "failed", "succeeded", "dead", "cancelled"];
const CANCELLABLE = new Set(["pending", "scheduled", "blocked", "running", "failed"]);
const RETRYABLE = new Set(["failed", "dead", "cancelled"]);
const REPRIORITISABLE = new Set(["pending", "scheduled", "blocked"]);
const BULK_MAX = 5000; // tasks a bulk action collects at most
const PAGE = 50;

let session = null; // GET /ui/session
let events = null; // the EventSource
let refreshTimer = null;
let current = null; // the view on screen: {render, onEvent}

// -- DOM helpers ----------------------------------------------------------------

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function $(id) {
  return document.getElementById(id);
}

function table(caption, headers, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      h("caption", { class: "sr-only" }, caption),
      h("thead", {}, h("tr", {}, headers.map((text) => h("th", { scope: "col" }, text)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((cell) => h("td", {}, cell))))),
    ),
  );
}

function stateLabel(state) {
  return h("span", { class: `state state-${state}` }, state);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function when(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  const date = new Date(epoch * 1000);
  return h("time", { datetime: date.toISOString(), title: date.toISOString() }, date.toLocaleString());
}

function now() {
  return Date.now() / 1000;
}

function shortId(id) {
  return id.length > 13 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id;
}

function taskLink(id) {
  return h("a", { href: `#/tasks/${encodeURIComponent(id)}`, title: id, "aria-label": `task ${id}` }, shortId(id));
}

function pretty(value) {
  if (value === undefined) return "";
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

function say(where, text, kind = "info") {
  where.replaceChildren(text ? h("p", { class: kind, role: kind === "error" ? "alert" : "status" }, text) : "");
}

// -- the API --------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, { method = "GET", body, params } = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== "" && value !== null && value !== undefined) url.searchParams.set(key, value);
  }
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    if (session && session.csrf) headers["X-CSRF-Token"] = session.csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
  }
  const response = await fetch(url, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    if (response.status === 401 && !path.startsWith("/ui/")) showLogin("Your session ended: log in again.");
    throw new ApiError(response.status, (data && data.detail) || `${response.status} ${response.statusText}`);
  }
  return data;
}

async function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").removeEventListener("click", yes);
      $("confirm-no").removeEventListener("click", no);
      dialog.removeEventListener("cancel", no);
      dialog.close();
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    $("confirm-yes").addEventListener("click", yes);
    $("confirm-no").addEventListener("click", no);
    dialog.addEventListener("cancel", no);
    dialog.showModal();
    $("confirm-no").focus();
  });
}

// -- login, session, live events ------------------------------------------------

function showLogin(message) {
  session = null;
  stopEvents();
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("view").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-key").focus();
}

async function start() {
  try {
    session = await api("/ui/session");
  } catch (error) {
    showLogin(error.status === 401 ? "" : error.message);
    return;
  }
  $("login").hidden = true;
  $("nav").hidden = false;
  for (const link of document.querySelectorAll("[data-may]")) link.hidden = !session.may[link.dataset.may];
  $("logout").hidden = !session.auth;
  $("who").textContent = session.auth ? `${session.name || session.key_id} (${session.role})` : "no authentication";
  startEvents();
  route();
}

async function logIn(event) {
  event.preventDefault();
  const key = $("login-key").value.trim();
  try {
    await api("/ui/login", { method: "POST", body: { key } });
  } catch (error) {
    $("login-error").textContent = `Login refused: ${error.message}`;
    return;
  }
  $("login-key").value = "";
  await start();
}

async function logOut() {
  try {
    await api("/ui/logout", { method: "POST" });
  } finally {
    showLogin("Logged out.");
  }
}

function startEvents() {
  stopEvents();
  if (!session.may.events) return; // a key limited to some queues sees no live stream
  events = new EventSource(`${API}/events?topics=tasks,counts,workers`);
  events.onopen = () => {
    $("banner").hidden = true;
    document.body.dataset.live = "open"; // for tests and styles: the stream is up
  };
  events.onerror = () => {
    $("banner").hidden = false;
    delete document.body.dataset.live;
    if (events && events.readyState === EventSource.CLOSED) {
      // the browser gave up (e.g. the broker answered 401 after a restart): check and retry
      stopEvents(false);
      setTimeout(reconnect, 3000);
    }
  };
  for (const topic of ["tasks", "counts", "workers", "lagged"]) {
    events.addEventListener(topic, (message) => {
      let data = null;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      if (current && current.onEvent) current.onEvent(topic, data);
    });
  }
}

async function reconnect() {
  try {
    session = await api("/ui/session");
  } catch (error) {
    if (error.status === 401) showLogin("The broker ended your session (it may have restarted): log in again.");
    else setTimeout(reconnect, 3000);
    return;
  }
  startEvents();
  refreshSoon();
}

function stopEvents(hideBanner = true) {
  if (events) events.close();
  events = null;
  delete document.body.dataset.live;
  if (hideBanner) $("banner").hidden = true;
}

function refreshSoon(delay = 500) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (current && current.refresh) current.refresh();
  }, delay);
}

// -- routing --------------------------------------------------------------------

function route() {
  if (!session) return;
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  for (const link of $("nav").querySelectorAll("a")) {
    const target = link.getAttribute("href").slice(1);
    const here = target === "/" ? path === "/" : path.startsWith(target);
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  let view;
  if (path.startsWith("/tasks/")) view = taskView(decodeURIComponent(path.slice(7)));
  else if (path === "/tasks") view = listView(params);
  else if (path === "/workers") view = workersView();
  else if (path === "/keys") view = keysView();
  else if (path === "/audit") view = auditView(params);
  else view = overview();
  current = view;
  $("view").replaceChildren(view.node);
  view.refresh();
}

// -- overview -------------------------------------------------------------------

function overview() {
  const counts = h("div", {}, h("p", {}, "Loading…"));
  const charts = h("div", { class: "charts" });
  const workers = h("div", {});
  const failures = h("div", {});
  const node = h(
    "section",
    { "aria-labelledby": "overview-title" },
    h("h1", { id: "overview-title" }, "Overview"),
    h("h2", {}, "Queues"),
    counts,
    h("h2", {}, "The last hour"),
    charts,
    h("h2", {}, "Workers"),
    workers,
    h("h2", {}, "Recent failures"),
    failures,
  );
  async function refresh() {
    try {
      const [stats, list] = await Promise.all([api(`${API}/stats`), api(`${API}/workers`)]);
      const names = Object.keys(stats.queues).sort().slice(0, 50);
      const oldest = await Promise.all(
        names.map((queue) =>
          (stats.queues[queue].pending || 0) > 0
            ? api(`${API}/tasks`, { params: { state: "pending", queue, limit: 1 } }).then(
                (page) => (page.tasks[0] ? now() - page.tasks[0].created_at : null),
                () => null,
              )
            : null,
        ),
      );
      counts.replaceChildren(queueTable(stats.queues, names, oldest));
      charts.replaceChildren(...historyCharts(stats.history));
      workers.replaceChildren(workerTable(list.workers));
    } catch (error) {
      say(counts, `Cannot read the broker's statistics: ${error.message}`, "error");
    }
    try {
      failures.replaceChildren(await failureTable());
    } catch (error) {
      say(failures, `Cannot list failures: ${error.message}`, "error"); // e.g. a key for several queues
    }
  }
  return { node, refresh, onEvent: () => refreshSoon(2000) }; // at most one reload per 2 s
}

function queueTable(queues, names, oldest) {
  const shown = ["pending", "scheduled", "running", "failed", "dead", "succeeded", "cancelled"];
  const rows = names.map((queue, i) => [
    h("a", { href: `#/tasks?queue=${encodeURIComponent(queue)}` }, queue),
    ...shown.map((state) => {
      const n = queues[queue][state] || 0;
      return n ? h("a", { href: `#/tasks?queue=${encodeURIComponent(queue)}&state=${state}` }, String(n)) : "0";
    }),
    ago(oldest[i]),
  ]);
  return table("Tasks per queue and state", ["Queue", ...shown, "Oldest pending"], rows, "No tasks yet.");
}

function historyCharts(history) {
  const rows = history.rows;
  const throughput = chart(
    "Tasks per minute",
    rows,
    [
      { name: "submitted", value: (r) => r.submitted, class: "line-a" },
      { name: "succeeded", value: (r) => r.succeeded, class: "line-b" },
      { name: "failed", value: (r) => r.failed, class: "line-c" },
    ],
    (v) => String(Math.round(v)),
  );
  const latency = chart(
    "Mean run time per minute",
    rows,
    [{ name: "run time (s)", value: (r) => (r.runs ? r.run_time / r.runs : null), class: "line-a" }],
    (v) => `${v < 1 ? v.toFixed(3) : v.toFixed(1)} s`,
  );
  return [throughput, latency];
}

function chart(title, rows, series, format) {
  const width = 600;
  const height = 160;
  const pad = { left: 48, right: 8, top: 8, bottom: 22 };
  let max = 0;
  for (const s of series) for (const r of rows) max = Math.max(max, s.value(r) || 0);
  const top = max > 0 ? max : 1;
  const x = (i) => pad.left + (i * (width - pad.left - pad.right)) / Math.max(1, rows.length - 1);
  const y = (v) => pad.top + (1 - v / top) * (height - pad.top - pad.bottom);
  const summary = series
    .map((s) => {
      const values = rows.map(s.value).filter((v) => v !== null);
      const total = values.reduce((a, b) => a + b, 0);
      const last = values.length ? values[values.length - 1] : null;
      return `${s.name}: last ${last === null ? "—" : format(last)}, peak ${format(Math.max(0, ...values))}${
        s.name.includes("run") ? "" : `, ${Math.round(total)} in the hour`
      }`;
    })
    .join("; ");
  const picture = svg(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${title}: ${summary}`, class: "chart" },
    svg("line", { x1: pad.left, y1: y(0), x2: width - pad.right, y2: y(0), class: "axis" }),
    svg("line", { x1: pad.left, y1: y(top), x2: width - pad.right, y2: y(top), class: "grid" }),
    svg("text", { x: pad.left - 4, y: y(top) + 4, "text-anchor": "end", class: "tick" }, format(top)),
    svg("text", { x: pad.left - 4, y: y(0), "text-anchor": "end", class: "tick" }, "0"),
    svg("text", { x: pad.left, y: height - 4, class: "tick" }, "60 min ago"),
    svg("text", { x: width - pad.right, y: height - 4, "text-anchor": "end", class: "tick" }, "now"),
    series.map((s) => {
      const points = [];
      rows.forEach((r, i) => {
        const v = s.value(r);
        if (v !== null) points.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      });
      const dots = [];
      rows.forEach((r, i) => {
        const v = s.value(r);
        if (v) dots.push(svg("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5, class: `dot ${s.class}` }));
      });
      return [svg("polyline", { points: points.join(" "), class: `series ${s.class}` }), ...dots];
    }),
  );
  const legend = h(
    "ul",
    { class: "legend" },
    series.map((s) => h("li", {}, h("span", { class: `swatch ${s.class}`, "aria-hidden": "true" }), s.name)),
  );
  return h("figure", { class: "chart-box" }, h("figcaption", {}, title), picture, legend, h("p", { class: "small" }, summary));
}

function workerTable(workers) {
  const rows = workers.map((w) => [
    w.name,
    w.host || "—",
    w.queues.join(", "),
    `${w.running} / ${w.concurrency}`,
    w.cpu === null || w.cpu === undefined ? "—" : `${Number(w.cpu).toFixed(0)} %`,
    ago(w.heartbeat_age),
    w.connected ? "connected" : "disconnected",
  ]);
  return table(
    "Workers",
    ["Name", "Host", "Queues", "Running / slots", "CPU", "Last heartbeat", "Connection"],
    rows,
    "No worker is connected.",
  );
}

async function failureTable() {
  const pages = await Promise.all(
    ["failed", "dead"].map((state) => api(`${API}/tasks`, { params: { state, order: "newest", limit: 10 } })),
  );
  const tasks = pages
    .flatMap((p) => p.tasks)
    .sort((a, b) => (b.finished_at || b.created_at) - (a.finished_at || a.created_at))
    .slice(0, 10);
  const rows = tasks.map((t) => [
    taskLink(t.id),
    t.type,
    t.queue,
    stateLabel(t.state),
    t.error ? `${t.error.type}: ${t.error.message}` : "—",
    when(t.finished_at),
  ]);
  return table("Recent failures", ["Task", "Type", "Queue", "State", "Error", "Finished"], rows, "No failures.");
}

// -- task list ------------------------------------------------------------------

const FILTERS = ["state", "queue", "type", "search", "since", "until", "order"];

function toEpoch(local) {
  if (!local) return "";
  const t = new Date(local).getTime();
  return Number.isFinite(t) ? String(t / 1000) : "";
}

function listView(params) {
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
  if (session.may.cancel) actions.append(h("button", { type: "button", class: "danger", onclick: () => bulk("cancel") }, "Cancel all matching…"));
  if (session.may.retry) actions.append(h("button", { type: "button", onclick: () => bulk("retry") }, "Retry all matching…"));
  if (session.may.purge) actions.append(h("button", { type: "button", class: "danger", onclick: purge }, "Purge finished tasks…"));
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

function taskView(id) {
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
    if (session.may.cancel && CANCELLABLE.has(t.state)) {
      actions.append(h("button", { type: "button", class: "danger", onclick: () => act("Cancel", () => api(`${API}/tasks/${encodeURIComponent(id)}`, { method: "DELETE" })) }, "Cancel task"));
    }
    if (session.may.retry && RETRYABLE.has(t.state)) {
      actions.append(h("button", { type: "button", onclick: () => act("Retry", () => api(`${API}/tasks/${encodeURIComponent(id)}/retry`, { method: "POST" })) }, "Retry task"));
    }
    if (session.may.set_priority && REPRIORITISABLE.has(t.state)) {
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

// -- workers, keys, audit ---------------------------------------------------------

function workersView() {
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

function keysView() {
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

function auditView(params) {
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

// -- start ----------------------------------------------------------------------

$("login-form").addEventListener("submit", logIn);
$("logout").addEventListener("click", logOut);
window.addEventListener("hashchange", () => {
  route();
  $("main").focus({ preventScroll: true });
});
start();
