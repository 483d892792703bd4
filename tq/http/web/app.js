// The tq dashboard: one page, plain ES modules, no framework, no build step.
//
// Data and actions go through the broker's REST API (/api/v1) with the session
// cookie; state-changing requests carry the CSRF token from GET /ui/session.
// Live updates come from GET /api/v1/events (server-sent events). Modules:
// lib.js (text-only DOM helpers, the API client), overview.js, tasks.js, lists.js.

import { $, API, api, refreshSoon, state } from "./lib.js";
import { auditView, keysView, workersView } from "./lists.js";
import { overview } from "./overview.js";
import { listView, taskView } from "./tasks.js";

let events = null; // the EventSource

// -- login, session, live events ------------------------------------------------

function showLogin(message) {
  state.session = null;
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
    state.session = await api("/ui/session");
  } catch (error) {
    showLogin(error.status === 401 ? "" : error.message);
    return;
  }
  $("login").hidden = true;
  $("nav").hidden = false;
  for (const link of document.querySelectorAll("[data-may]")) link.hidden = !state.session.may[link.dataset.may];
  $("logout").hidden = !state.session.auth;
  $("who").textContent = state.session.auth ? `${state.session.name || state.session.key_id} (${state.session.role})` : "no authentication";
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
  if (!state.session.may.events) return; // a key limited to some queues sees no live stream
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
      if (state.current && state.current.onEvent) state.current.onEvent(topic, data);
    });
  }
}

async function reconnect() {
  try {
    state.session = await api("/ui/session");
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


// -- routing --------------------------------------------------------------------

function route() {
  if (!state.session) return;
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
  state.current = view;
  $("view").replaceChildren(view.node);
  view.refresh();
}

// -- start ----------------------------------------------------------------------

state.onUnauthorized = showLogin;
$("login-form").addEventListener("submit", logIn);
$("logout").addEventListener("click", logOut);
window.addEventListener("hashchange", () => {
  route();
  $("main").focus({ preventScroll: true });
});
start();
