// Shared by the dashboard's modules: DOM helpers that write text (never HTML), the
// REST client with the session's CSRF token, the confirmation dialog, shared state.
//
// Safety rule: everything a remote party chose (task types, queues, payloads,
// errors, worker names, key names) is written with textContent (h() turns strings
// into text nodes); nothing is ever assigned to innerHTML.

export const API = "/api/v1";
export const STATES = ["pending", "scheduled", "blocked", "running", "failed", "succeeded", "dead", "cancelled"];
export const CANCELLABLE = new Set(["pending", "scheduled", "blocked", "running", "failed"]);
export const RETRYABLE = new Set(["failed", "dead", "cancelled"]);
export const REPRIORITISABLE = new Set(["pending", "scheduled", "blocked"]);

// session: GET /ui/session; current: the view on screen ({node, refresh, onEvent});
// onUnauthorized: what to do when the broker no longer knows the session (app.js)
export const state = { session: null, current: null, onUnauthorized: () => {} };
let refreshTimer = null;

export function refreshSoon(delay = 500) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    if (state.current && state.current.refresh) state.current.refresh();
  }, delay);
}

// -- DOM helpers ----------------------------------------------------------------

export function h(tag, attrs, ...children) {
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

export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function $(id) {
  return document.getElementById(id);
}

export function table(caption, headers, rows, empty) {
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

export function stateLabel(state) {
  return h("span", { class: `state state-${state}` }, state);
}

export function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function when(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  const date = new Date(epoch * 1000);
  return h("time", { datetime: date.toISOString(), title: date.toISOString() }, date.toLocaleString());
}

export function now() {
  return Date.now() / 1000;
}

export function shortId(id) {
  return id.length > 13 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id;
}

export function taskLink(id) {
  return h("a", { href: `#/tasks/${encodeURIComponent(id)}`, title: id, "aria-label": `task ${id}` }, shortId(id));
}

export function pretty(value) {
  if (value === undefined) return "";
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

export function say(where, text, kind = "info") {
  where.replaceChildren(text ? h("p", { class: kind, role: kind === "error" ? "alert" : "status" }, text) : "");
}

// -- the API --------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export async function api(path, { method = "GET", body, params } = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== "" && value !== null && value !== undefined) url.searchParams.set(key, value);
  }
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    if (state.session && state.session.csrf) headers["X-CSRF-Token"] = state.session.csrf;
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
    if (response.status === 401 && !path.startsWith("/ui/")) state.onUnauthorized("Your session ended: log in again.");
    throw new ApiError(response.status, (data && data.detail) || `${response.status} ${response.statusText}`);
  }
  return data;
}

export async function confirmAction(text) {
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
