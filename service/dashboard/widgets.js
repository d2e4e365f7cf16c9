// Small pieces the views share: badges, bars, alerts, cards, tables and links.

import { fmtNum, h } from "./dom.js";

export function statusBadge(status) {
  return h("span", { class: ["status", `status-${status}`], "data-status": status }, status.replace("_", " "));
}

export function progressBar(step, total) {
  const frac = total ? Math.min(1, step / total) : 0;
  const bar = h("div", { class: "bar" });
  bar.style.width = `${(frac * 100).toFixed(1)}%`;
  return h("div", { class: "progress", title: total ? `${step}/${total} steps` : "not started" },
    h("div", { class: "track" }, bar),
    h("span", { class: "progress-text" }, total ? `${step}/${total}` : "—"));
}

export function errorBox(err) {
  const message = err instanceof Error ? err.message : String(err);
  return h("div", { class: "alert error", role: "alert" }, message);
}

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", null, title) : null, ...children);
}

export function kv(rows) {
  return h("dl", { class: "kv" },
    rows.filter(Boolean).map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

function scalarMetrics(metrics) {
  return Object.entries(metrics || {}).filter(
    ([, v]) => typeof v === "number" || typeof v === "boolean" || typeof v === "string",
  );
}

export function metricsTable(metrics) {
  const rows = scalarMetrics(metrics);
  if (!rows.length) return h("p", { class: "muted" }, "No metrics yet.");
  return h("table", { class: "metrics" },
    h("tbody", null, rows.map(([k, v]) =>
      h("tr", null, h("th", null, k), h("td", { class: "num" }, typeof v === "number" ? fmtNum(v) : String(v))))));
}

// Column headers; a trailing "#" marks a numeric (right-aligned) column.
export function headRow(titles) {
  return h("thead", null, h("tr", null, titles.map((t) =>
    t.endsWith("#") ? h("th", { class: "num" }, t.slice(0, -1)) : h("th", null, t))));
}

export function pageHead(title, ...actions) {
  return h("div", { class: "page-head" }, h("h1", null, title), h("div", { class: "actions" }, ...actions));
}

export function jobLink(id) {
  return h("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "mono" }, id);
}

export function adapterLink(name) {
  return h("a", { href: `#/adapters/${encodeURIComponent(name)}` }, name);
}
