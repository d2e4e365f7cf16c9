// #/jobs (the list, refreshed while a job is active) and #/jobs/<id> (one job: progress,
// live loss and validation curves, settings, metrics, event log, cancel).

import { api, followJob, listAll } from "./api.js";
import { createChart } from "./chart.js";
import { fmtAge, fmtClock, fmtDuration, fmtNum, fmtPct, fmtTime, h, replace } from "./dom.js";
import { ACTIVE, CANCELLABLE, methodLabel, trainedMethod, trainSeconds, valAccuracy } from "./records.js";
import {
  adapterLink,
  card,
  errorBox,
  headRow,
  jobLink,
  kv,
  metricsTable,
  pageHead,
  progressBar,
  statusBadge,
} from "./widgets.js";

function show(v) {
  return typeof v === "string" ? v : JSON.stringify(v);
}

export async function jobsView(ctx) {
  const { view } = ctx;
  document.title = "Jobs · loraplex";
  const tbody = h("tbody");
  const table = h("table", { class: "list", id: "jobs-table" },
    headRow(["Job", "Adapter", "Method", "Status", "Progress", "Val. accuracy#", "Created", "Duration#"]),
    tbody);
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet. ",
    h("a", { href: "#/new" }, "Start one."));
  view.append(pageHead("Fine-tuning jobs", h("a", { class: "button", href: "#/new", id: "new-job-link" }, "New job")),
    h("div", { class: "card flush" }, table, empty));

  let timer = null;
  ctx.defer(() => clearTimeout(timer));
  async function load() {
    const jobs = await listAll("/v1/fine_tuning/jobs", { signal: ctx.signal, maxPages: 2 });
    replace(tbody, jobs.map((j) =>
      h("tr", { "data-job": j.id },
        h("td", null, jobLink(j.id)),
        h("td", null, j.fine_tuned_adapter ? adapterLink(j.fine_tuned_adapter) : j.adapter_name),
        h("td", null, methodLabel(j.method)),
        h("td", null, statusBadge(j.status)),
        h("td", null, progressBar(j.progress.step, j.progress.total_steps)),
        h("td", { class: "num" }, fmtPct(valAccuracy(j))),
        h("td", { title: fmtTime(j.created_at) }, fmtAge(j.created_at)),
        h("td", { class: "num" }, fmtDuration(trainSeconds(j) ?? (j.started_at ? Date.now() / 1000 - j.started_at : null))))));
    empty.hidden = jobs.length > 0;
    table.hidden = jobs.length === 0;
    return jobs.some((j) => ACTIVE.has(j.status));
  }
  // Refreshed every 2 s while a job is active, else every 15 s; a failed refresh (the
  // server restarting, say) is retried at the next one.
  async function tick(first) {
    let active = true;
    try {
      active = await load();
    } catch (err) {
      if (ctx.signal.aborted) return;
      if (first) throw err;
    }
    if (!ctx.signal.aborted) timer = setTimeout(() => tick(false), active ? 2000 : 15000);
  }
  await tick(true);
}

export async function jobView(ctx, jobId) {
  const { view } = ctx;
  document.title = `${jobId} · loraplex`;
  let job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`, { signal: ctx.signal });

  const title = h("h1", null, job.adapter_name);
  const status = h("span");
  const live = h("span", { class: "live", id: "live" });
  const cancelBtn = h("button", { class: "danger", id: "cancel-job", type: "button" }, "Cancel job");
  const adapterAction = h("span");
  const progress = h("div", { id: "job-progress" });
  const summary = h("div");
  const errorArea = h("div");
  const finalMetrics = h("div");
  const metricsTitle = h("h2", null, "Metrics");
  const logBody = h("tbody");
  const lossEl = h("div", { id: "loss-chart", "data-chart": "loss" });
  const valEl = h("div", { id: "val-chart", "data-chart": "validation" });

  view.append(
    h("div", { class: "page-head" },
      h("div", null, h("div", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ",
        h("span", { class: "mono" }, job.id)), title),
      h("div", { class: "actions" }, status, live, adapterAction, cancelBtn)),
    errorArea,
    h("div", { class: "card" }, progress),
    h("div", { class: "grid two" },
      card("Training loss", lossEl),
      card("Validation metrics", valEl)),
    h("div", { class: "grid two" },
      card("Hyperparameters", summary),
      h("section", { class: "card" }, metricsTitle, finalMetrics)),
    card("Event log",
      h("div", { class: "scroll" },
        h("table", { class: "log", id: "event-log" },
          h("thead", null, h("tr", null, h("th", null, "Time"), h("th", null, "Level"), h("th", null, "Message"))),
          logBody))),
  );

  const every = job.hyperparameters?.eval_every_steps;
  const lossChart = createChart(lossEl, { xLabel: "step", yLabel: "loss", xInteger: true,
    empty: "Waiting for the first steps…" });
  const valChart = createChart(valEl, { xLabel: "step", yLabel: "score", yMin: 0, yMax: 1, xInteger: true,
    empty: every ? `Validation runs every ${every} steps` : "Validation runs at each epoch end" });

  const seen = new Set();
  const curves = { train: [], step: [], valLoss: [], acc: [], f1: [] };
  let drawQueued = false;
  function draw() {
    if (drawQueued) return;
    drawQueued = true;
    requestAnimationFrame(() => {
      drawQueued = false;
      lossChart.update([
        { name: "training loss", points: curves.train },
        { name: "batch loss", points: curves.step, faint: true, colorIndex: 5 },
        { name: "validation loss", points: curves.valLoss, markers: true, colorIndex: 1 },
      ].filter((sr) => sr.points.length || sr.name === "training loss"));
      valChart.update([
        { name: "accuracy", points: curves.acc, markers: true, colorIndex: 2 },
        { name: "macro-F1", points: curves.f1, markers: true, colorIndex: 3 },
      ].filter((sr) => sr.points.length));
    });
  }

  function onEvent(ev) {
    if (seen.has(ev.id)) return;
    seen.add(ev.id);
    const d = ev.data || {};
    if (ev.type === "metrics" && typeof d.step === "number") {
      if (typeof d.train_loss === "number") curves.train.push({ x: d.step, y: d.train_loss });
      if (typeof d.step_loss === "number") curves.step.push({ x: d.step, y: d.step_loss });
      if (typeof d.val_loss === "number") curves.valLoss.push({ x: d.step, y: d.val_loss });
      if (typeof d.val_accuracy === "number") curves.acc.push({ x: d.step, y: d.val_accuracy });
      if (typeof d.val_macro_f1 === "number") curves.f1.push({ x: d.step, y: d.val_macro_f1 });
      draw();
    }
    logBody.prepend(h("tr", { class: `level-${ev.level}` },
      h("td", { class: "mono", title: fmtTime(ev.created_at) }, fmtClock(ev.created_at)),
      h("td", null, ev.level),
      h("td", null, ev.message)));
  }

  let confirmTimer = null;
  ctx.defer(() => clearTimeout(confirmTimer));
  cancelBtn.addEventListener("click", async () => {
    if (!cancelBtn.classList.contains("confirm")) {
      cancelBtn.classList.add("confirm");
      cancelBtn.textContent = "Click again to cancel";
      confirmTimer = setTimeout(() => {
        cancelBtn.classList.remove("confirm");
        cancelBtn.textContent = "Cancel job";
      }, 4000);
      return;
    }
    clearTimeout(confirmTimer);
    cancelBtn.disabled = true;
    cancelBtn.textContent = "Cancelling…";
    try {
      onJob(await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
    } catch (err) {
      replace(errorArea, errorBox(err));
      cancelBtn.disabled = false;
      cancelBtn.classList.remove("confirm");
      cancelBtn.textContent = "Cancel job";
    }
  });

  function onJob(j) {
    job = j;
    replace(status, statusBadge(j.status));
    cancelBtn.hidden = !ACTIVE.has(j.status);
    if (!CANCELLABLE.has(j.status)) cancelBtn.disabled = true;
    if (j.status === "cancel_requested") cancelBtn.textContent = "Stopping…";
    replace(adapterAction, j.fine_tuned_adapter
      ? h("a", { class: "button", href: `#/adapters/${encodeURIComponent(j.fine_tuned_adapter)}`, id: "open-adapter" },
        "Try the adapter")
      : null);
    const p = j.progress;
    const eta = j.estimated_finish && ACTIVE.has(j.status)
      ? `about ${fmtDuration(j.estimated_finish - Date.now() / 1000)} left` : null;
    replace(progress, h("div", { class: "progress-row" },
      progressBar(p.step, p.total_steps),
      h("span", { class: "muted" },
        [p.epoch !== null && p.epoch !== undefined ? `epoch ${fmtNum(p.epoch, 2)}` : null,
          j.started_at ? `started ${fmtAge(j.started_at)}` : "waiting for a worker",
          trainSeconds(j) !== null ? `trained in ${fmtDuration(trainSeconds(j))}` : null,
          eta].filter(Boolean).join(" · "))));
    const method = j.method || {};
    const trained = trainedMethod(method);
    const params = method[trained] || {};
    replace(summary, kv([
      ["Method", methodLabel(method)],
      ...Object.entries(params).map(([k, v]) => [`${trained}.${k}`, show(v)]),
      ...Object.entries(j.hyperparameters || {}).map(([k, v]) => [k, show(v)]),
      ["seed", String(j.seed)],
      ["training file", h("a", { href: `#/compare/${encodeURIComponent(j.training_file)}`, class: "mono",
        title: "Compare the jobs trained on this dataset" }, j.training_file)],
      ["validation file", j.validation_file || "10 % of the training rows"],
      ["base model", j.model],
      ["created", fmtTime(j.created_at)],
    ]));
    metricsTitle.textContent = ACTIVE.has(j.status) ? "Latest metrics" : "Final metrics";
    replace(finalMetrics, metricsTable(j.metrics));
    if (!ACTIVE.has(j.status)) {
      lossChart.setEmpty("No training steps were recorded");
      valChart.setEmpty("No validation was recorded");
    }
    if (j.error) replace(errorArea, h("div", { class: "alert error" }, `${j.error.code || "error"}: ${j.error.message}`));
  }

  onJob(job);
  live.textContent = "connecting…";
  const stop = followJob(job.id, {
    onJob,
    onEvent,
    onMode: (mode) => {
      live.textContent = mode === "stream" ? "● live" : "polling";
      live.dataset.mode = mode;
    },
    onDone: (st) => {
      live.textContent = "";
      live.dataset.mode = "done";
      live.dataset.final = st;
    },
    onError: (err) => replace(errorArea, errorBox(err)),
  });
  ctx.defer(stop);
}
