// The overview: queues, the last hour as charts, workers, recent failures.

import {
  API,
  refreshSoon,
  h,
  svg,
  table,
  stateLabel,
  ago,
  when,
  now,
  taskLink,
  say,
  api,
} from "./lib.js";

// -- overview -------------------------------------------------------------------

export function overview() {
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
      const [stats, list, depth] = await Promise.all([
        api(`${API}/stats`),
        api(`${API}/workers`),
        api(`${API}/queues`).catch(() => ({ queues: [] })), // paused and capped queues
      ]);
      const status = new Map(depth.queues.map((q) => [q.queue, q]));
      const names = [...new Set([...Object.keys(stats.queues), ...status.keys()])].sort().slice(0, 50);
      const oldest = await Promise.all(
        names.map((queue) =>
          ((stats.queues[queue] || {}).pending || 0) > 0
            ? api(`${API}/tasks`, { params: { state: "pending", queue, limit: 1 } }).then(
                (page) => (page.tasks[0] ? now() - page.tasks[0].created_at : null),
                () => null,
              )
            : null,
        ),
      );
      counts.replaceChildren(queueTable(stats.queues, names, oldest, status));
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

function queueTable(queues, names, oldest, status) {
  const shown = ["pending", "scheduled", "running", "failed", "dead", "succeeded", "cancelled"];
  const rows = names.map((queue, i) => [
    h("a", { href: `#/tasks?queue=${encodeURIComponent(queue)}` }, queue),
    ...shown.map((state) => {
      const n = (queues[queue] || {})[state] || 0;
      return n ? h("a", { href: `#/tasks?queue=${encodeURIComponent(queue)}&state=${state}` }, String(n)) : "0";
    }),
    ago(oldest[i]),
    queueStatus(status.get(queue)),
  ]);
  return table("Tasks per queue and state", ["Queue", ...shown, "Oldest pending", "Status"], rows, "No tasks yet.");
}

// "paused" (hands nothing out) and the queue's cap, as tq queue list shows them
function queueStatus(entry) {
  if (!entry) return "—";
  const parts = [];
  if (entry.paused) parts.push("paused");
  const cap = entry.cap;
  if (cap && cap.concurrency !== null && cap.concurrency !== undefined) parts.push(`cap: ${cap.concurrency} running`);
  if (cap && cap.rate !== null && cap.rate !== undefined) parts.push(`cap: ${rateText(cap.rate)}`);
  return parts.length ? parts.join(", ") : "—";
}

function rateText(rate) {
  if (rate >= 1) return `${Number(rate.toPrecision(4))}/s`;
  if (rate * 60 >= 1) return `${Number((rate * 60).toPrecision(4))}/m`;
  return `${Number((rate * 3600).toPrecision(4))}/h`;
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
