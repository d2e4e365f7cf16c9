// #/compare[/<dataset>]: the jobs trained on one dataset side by side, as a table and as
// accuracy against trainable parameters and against training time.

import { api, listAll } from "./api.js";
import { createChart } from "./chart.js";
import { fmtBytes, fmtDuration, fmtInt, fmtNum, fmtPct, fmtShare, h } from "./dom.js";
import { METHOD_NAMES, methodLabel, trainSeconds, valAccuracy } from "./records.js";
import { adapterLink, card, headRow, pageHead, statusBadge } from "./widgets.js";

export async function compareView(ctx, datasetId) {
  const { view } = ctx;
  document.title = "Compare · loraplex";
  const [datasets, recent] = await Promise.all([
    listAll("/v1/datasets", { signal: ctx.signal, maxPages: 3 }),
    api("/v1/fine_tuning/jobs?limit=1", { signal: ctx.signal }),
  ]);
  if (!datasetId) datasetId = recent.data[0]?.training_file || datasets[0]?.id;
  const select = h("select", { id: "compare-dataset" },
    datasets.map((d) => h("option", { value: d.id, selected: d.id === datasetId },
      `${d.name} · ${fmtInt(d.row_count)} rows · ${d.id}`)));
  select.addEventListener("change", () => {
    location.hash = `#/compare/${encodeURIComponent(select.value)}`;
  });
  view.append(pageHead("Compare methods", h("label", { for: "compare-dataset", class: "muted" }, "Dataset "), select));
  if (!datasetId) {
    view.append(h("p", { class: "card muted" }, "No datasets yet."));
    return;
  }
  const [jobs, adapters] = await Promise.all([
    listAll(`/v1/fine_tuning/jobs?training_file=${encodeURIComponent(datasetId)}`, { signal: ctx.signal }),
    listAll("/v1/adapters", { signal: ctx.signal }),
  ]);
  const byJob = new Map(adapters.filter((a) => a.source_job_id).map((a) => [a.source_job_id, a]));
  const rows = jobs.map((j) => {
    const a = byJob.get(j.id) || null;
    return { job: j, adapter: a, acc: valAccuracy(j, a), seconds: trainSeconds(j) };
  });
  rows.sort((x, y) => (y.acc ?? -1) - (x.acc ?? -1));
  const done = rows.filter((r) => r.adapter && r.acc !== null);

  const paramsEl = h("div", { id: "chart-params", "data-chart": "params" });
  const timeEl = h("div", { id: "chart-time", "data-chart": "time" });
  view.append(
    h("p", { class: "muted" }, `${rows.length} job${rows.length === 1 ? "" : "s"} trained on this dataset; `,
      `${done.length} finished with an adapter. Accuracy is validation accuracy at each job's best step.`),
    h("div", { class: "grid two" },
      card("Accuracy vs trainable parameters", paramsEl),
      card("Accuracy vs training time", timeEl)),
    h("div", { class: "card flush" }, h("table", { class: "list", id: "compare-table" },
      headRow(["Method (job)", "Adapter", "Status", "Val. accuracy#", "Val. loss#", "Trainable params#", "Trainable %#", "Training time#", "Size#"]),
      h("tbody", null, rows.map(({ job, adapter, acc, seconds }) => h("tr", { "data-job": job.id },
        h("td", null, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, title: job.id }, methodLabel(job.method))),
        h("td", null, adapter ? adapterLink(adapter.name) : job.adapter_name),
        h("td", null, statusBadge(job.status)),
        h("td", { class: "num" }, fmtPct(acc)),
        h("td", { class: "num" }, fmtNum(job.metrics?.val_loss ?? adapter?.metrics?.val_loss)),
        h("td", { class: "num" }, adapter ? fmtInt(adapter.trainable_params) : "—"),
        h("td", { class: "num" }, adapter ? fmtShare(adapter.trainable_pct) : "—"),
        h("td", { class: "num" }, fmtDuration(seconds)),
        h("td", { class: "num" }, adapter ? fmtBytes(adapter.size_bytes) : "—")))))),
  );
  // One series per method, so each method keeps its colour in both charts.
  const types = [...new Set(done.map((r) => r.job.method.type))];
  const series = (x) => types.map((type) => ({
    name: METHOD_NAMES[type] || type,
    colorIndex: Object.keys(METHOD_NAMES).indexOf(type),
    points: done.filter((r) => r.job.method.type === type).map((r) => ({
      x: x(r), y: r.acc, label: methodLabel(r.job.method),
      title: `${r.adapter.name}: ${fmtPct(r.acc)}, ${fmtInt(r.adapter.trainable_params)} params, ${fmtDuration(r.seconds)}`,
    })),
  }));
  const empty = "Finished jobs appear here";
  createChart(paramsEl, { kind: "scatter", xLog: true, yBounds: [0, 1], xLabel: "trainable parameters (log)", yLabel: "val. accuracy", empty })
    .update(series((r) => r.adapter.trainable_params));
  createChart(timeEl, { kind: "scatter", yBounds: [0, 1], xLabel: "training time (s)", yLabel: "val. accuracy", empty })
    .update(series((r) => r.seconds ?? NaN));
}
