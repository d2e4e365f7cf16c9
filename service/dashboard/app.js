// The loraplex dashboard: hash-routed views over the public API.
//   #/login  #/jobs  #/jobs/<id>  #/new  #/adapters  #/adapters/<name>  #/compare[/<dataset>]

import {
  ApiError,
  api,
  clearKey,
  followJob,
  getKey,
  listAll,
  setKey,
  setUnauthorizedHandler,
} from "./api.js";
import { createChart } from "./chart.js";
import {
  clear,
  fmtAge,
  fmtBytes,
  fmtClock,
  fmtDuration,
  fmtInt,
  fmtNum,
  fmtPct,
  fmtShare,
  fmtTime,
  h,
  replace,
} from "./dom.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");

const ACTIVE = new Set(["validating_files", "queued", "running", "cancel_requested"]);
const CANCELLABLE = new Set(["validating_files", "queued", "running"]);

// Display names only: what each method is, its settings, defaults and ranges come from the
// server (GET /v1/methods, derived from core's configs). The order fixes chart colours.
const METHOD_NAMES = {
  lora: "LoRA",
  adapter: "Bottleneck adapter",
  prompt_tuning: "Prompt tuning",
  feature_extraction: "Feature extraction",
  full: "Full fine-tuning",
};

function methodLabel(method) {
  if (!method) return "—";
  const type = typeof method === "string" ? method : method.type;
  const params = (typeof method === "object" && method[type]) || {};
  let extra = "";
  if (type === "lora" && params.r) extra = ` r=${params.r}`;
  if (type === "adapter" && params.bottleneck_size) extra = ` ${params.bottleneck_size}`;
  if (type === "prompt_tuning" && params.n_virtual_tokens) extra = ` ${params.n_virtual_tokens} tok`;
  return `${METHOD_NAMES[type] || type}${extra}`;
}

// --- small pieces -----------------------------------------------------------------------------

function statusBadge(status) {
  return h("span", { class: ["status", `status-${status}`], "data-status": status }, status.replace("_", " "));
}

function progressBar(step, total) {
  const frac = total ? Math.min(1, step / total) : 0;
  const bar = h("div", { class: "bar" });
  bar.style.width = `${(frac * 100).toFixed(1)}%`;
  return h("div", { class: "progress", title: total ? `${step}/${total} steps` : "not started" },
    h("div", { class: "track" }, bar),
    h("span", { class: "progress-text" }, total ? `${step}/${total}` : "—"));
}

function errorBox(err) {
  const message = err instanceof Error ? err.message : String(err);
  return h("div", { class: "alert error", role: "alert" }, message);
}

function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", null, title) : null, ...children);
}

function kv(rows) {
  return h("dl", { class: "kv" },
    rows.filter(Boolean).map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

function scalarMetrics(metrics) {
  return Object.entries(metrics || {}).filter(
    ([, v]) => typeof v === "number" || typeof v === "boolean" || typeof v === "string",
  );
}

function metricsTable(metrics) {
  const rows = scalarMetrics(metrics);
  if (!rows.length) return h("p", { class: "muted" }, "No metrics yet.");
  return h("table", { class: "metrics" },
    h("tbody", null, rows.map(([k, v]) =>
      h("tr", null, h("th", null, k), h("td", { class: "num" }, typeof v === "number" ? fmtNum(v) : String(v))))));
}

function valAccuracy(job, adapter) {
  const m = job?.metrics || {};
  const a = adapter?.metrics || {};
  return m.val_accuracy ?? a.val_accuracy ?? null;
}

function trainSeconds(job) {
  return job.started_at && job.finished_at ? job.finished_at - job.started_at : null;
}

// Column headers; a trailing "#" marks a numeric (right-aligned) column.
function headRow(titles) {
  return h("thead", null, h("tr", null, titles.map((t) =>
    t.endsWith("#") ? h("th", { class: "num" }, t.slice(0, -1)) : h("th", null, t))));
}

function show(v) {
  return typeof v === "string" ? v : JSON.stringify(v);
}

function pageHead(title, ...actions) {
  return h("div", { class: "page-head" }, h("h1", null, title), h("div", { class: "actions" }, ...actions));
}

function jobLink(id) {
  return h("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "mono" }, id);
}

function adapterLink(name) {
  return h("a", { href: `#/adapters/${encodeURIComponent(name)}` }, name);
}

// --- router -----------------------------------------------------------------------------------

const routes = [
  [/^#\/login$/, loginView],
  [/^#\/jobs\/?$/, jobsView],
  [/^#\/jobs\/([^/]+)$/, jobView],
  [/^#\/new$/, newJobView],
  [/^#\/adapters\/?$/, adaptersView],
  [/^#\/adapters\/([^/]+)$/, adapterView],
  [/^#\/compare(?:\/([^/]+))?$/, compareView],
];

let current = null; // {controller, cleanups}
let loginNotice = null;

function showNav(signedIn) {
  nav.hidden = !signedIn;
  const hash = location.hash;
  for (const a of nav.querySelectorAll("a[data-route]")) {
    const active = hash.startsWith(a.getAttribute("href"));
    a.classList.toggle("active", active);
    if (active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function render() {
  if (current) {
    current.controller.abort();
    for (const fn of current.cleanups) fn();
  }
  const ctx = { controller: new AbortController(), cleanups: [] };
  ctx.signal = ctx.controller.signal;
  ctx.defer = (fn) => ctx.cleanups.push(fn);
  current = ctx;

  let hash = location.hash;
  if (!hash || hash === "#" || hash === "#/") {
    location.replace("#/jobs");
    return;
  }
  if (!getKey() && hash !== "#/login") {
    location.replace("#/login");
    return;
  }
  showNav(Boolean(getKey()) && hash !== "#/login");
  clear(view);
  for (const [pattern, fn] of routes) {
    const m = hash.match(pattern);
    if (!m) continue;
    const args = m.slice(1).map((x) => (x === undefined ? undefined : decodeURIComponent(x)));
    document.title = "loraplex";
    try {
      await fn(ctx, ...args);
    } catch (err) {
      if (ctx.signal.aborted || err?.name === "AbortError") return;
      view.append(errorBox(err));
    }
    return;
  }
  view.append(pageHead("Not found"), h("p", null, "No such page. ", h("a", { href: "#/jobs" }, "Jobs")));
}

setUnauthorizedHandler((err) => {
  clearKey();
  loginNotice = `Signed out: ${err.message}`;
  location.hash = "#/login";
});

document.getElementById("sign-out").addEventListener("click", () => {
  clearKey();
  loginNotice = "Signed out.";
  location.hash = "#/login";
});

window.addEventListener("hashchange", render);
render();

// --- sign in ----------------------------------------------------------------------------------

function loginView() {
  document.title = "Sign in · loraplex";
  const input = h("input", {
    id: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "lpx_…", required: true,
  });
  const message = h("div", { id: "login-message" });
  if (loginNotice) {
    message.append(h("div", { class: "alert info" }, loginNotice));
    loginNotice = null;
  }
  const button = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const form = h("form", { id: "login-form", class: "stack" },
    h("label", { for: "api-key" }, "API key"), input, button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    clear(message);
    try {
      await api("/v1/fine_tuning/jobs?limit=1", { key });
      setKey(key);
      location.hash = "#/jobs";
    } catch (err) {
      const text = err.status === 401
        ? "That key was not accepted."
        : err.status === 403
          ? "That is an admin key: sign in with a tenant's key."
          : err.message;
      message.append(h("div", { class: "alert error", role: "alert" }, text));
    } finally {
      button.disabled = false;
    }
  });
  view.append(
    h("section", { class: "card login" },
      h("h1", null, "Sign in to loraplex"),
      h("p", null, "Paste a tenant's API key. It is kept in this tab's session storage only and sent in the Authorization header; closing the tab forgets it."),
      form,
      message,
      h("p", { class: "muted small" }, "The default tenant's key is in the file ",
        h("code", null, "default_api_key"), " in the server's data directory.")),
  );
  input.focus();
}

// --- jobs -------------------------------------------------------------------------------------

async function jobsView(ctx) {
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

async function jobView(ctx, jobId) {
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
    const params = method[method.type] || {};
    replace(summary, kv([
      ["Method", methodLabel(method)],
      ...Object.entries(params).map(([k, v]) => [`${method.type}.${k}`, show(v)]),
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

// --- new job ----------------------------------------------------------------------------------

// One form field from a JSON Schema property of GET /v1/methods (core's config field): the
// input fits the type, starts at core's default and carries its range and description.
// read() gives the value to send, or undefined when the field is blank or left at the default
// (the job then records only what was chosen; the server fills in the rest).
function schemaField(id, prop, placeholder = null) {
  const nullable = (prop.anyOf || []).some((b) => b.type === "null");
  const branches = (prop.anyOf || [prop]).filter((b) => b.type !== "null");
  const only = branches.length === 1 ? branches[0] : null;
  const fallback = placeholder ?? (prop.default === null || prop.default === undefined ? "" : null);
  let input;
  let parse;
  let initial;
  if (only?.enum) {
    input = h("select", { id },
      nullable ? h("option", { value: "" }, "—") : null,
      only.enum.map((v) => h("option", { value: v }, String(v))));
    initial = prop.default ?? "";
    parse = (v) => v;
  } else if (only?.type === "boolean") {
    input = h("input", { id, type: "checkbox" });
    input.checked = Boolean(prop.default);
  } else if (only?.type === "integer" || only?.type === "number") {
    input = h("input", { id, type: "number", step: only.type === "integer" ? 1 : "any",
      min: only.minimum ?? only.exclusiveMinimum, max: only.maximum ?? only.exclusiveMaximum });
    initial = prop.default ?? "";
    parse = Number;
  } else {
    // Unions and lists (learning_rate, target_modules, adam_betas, ...): JSON, or plain text.
    const text = only?.type === "string";
    input = h("input", { id, type: "text", class: text ? null : "mono" });
    initial = prop.default === null || prop.default === undefined ? ""
      : text || typeof prop.default === "string" ? prop.default : JSON.stringify(prop.default);
    parse = (v) => {
      if (text) return v;
      try {
        return JSON.parse(v);
      } catch {
        return v;
      }
    };
  }
  if (fallback !== null) {
    // Where the default depends on the method ("auto"), the box starts blank and says it.
    if (input.type !== "checkbox") input.value = "";
    if (fallback && "placeholder" in input) input.placeholder = fallback;
  } else if (input.type !== "checkbox") {
    input.value = String(initial);
  }
  const start = input.type === "checkbox" ? input.checked : input.value;
  const read = () => {
    if (input.type === "checkbox") return input.checked === start ? undefined : input.checked;
    const v = input.value.trim();
    return v === "" || v === start ? undefined : parse(v);
  };
  // Labelled with the API's own name for the setting, as the job page shows it.
  const name = id.replace(/^(mp|hp)-/, "");
  const hint = h("span", { class: "hint" }, prop.description || "");
  const el = input.type === "checkbox"
    ? h("div", { class: "field" }, h("label", { class: "check mono" }, input, name), hint)
    : h("div", { class: "field" }, h("label", { for: id, class: "mono" }, name), input, hint);
  return { input, el, read };
}

// Shown up front; the other training settings sit under "More settings".
const MAIN_SETTINGS = ["n_epochs", "max_steps", "batch_size", "learning_rate", "warmup_ratio", "lr_scheduler",
  "eval_every_steps", "early_stopping_patience", "max_seq_length"];

function readFields(fields) {
  const out = {};
  for (const [key, f] of Object.entries(fields)) {
    const v = f.read();
    if (v !== undefined) out[key] = v;
  }
  return out;
}

async function newJobView(ctx) {
  document.title = "New job · loraplex";
  const [datasets, catalog] = await Promise.all([
    listAll("/v1/datasets", { signal: ctx.signal, maxPages: 3 }),
    api("/v1/methods", { signal: ctx.signal }),
  ]);
  const hyperDefaults = catalog.hyperparameters.defaults;

  // 1. training data ----------------------------------------------------------------------
  const trainSelect = h("select", { id: "dataset-select" });
  const valSelect = h("select", { id: "validation-select" });
  function fillSelects(selected) {
    replace(trainSelect, h("option", { value: "" }, "— upload a file or pick a dataset —"),
      datasets.map((d) => h("option", { value: d.id }, `${d.name} · ${d.kind} · ${fmtInt(d.row_count)} rows · ${d.id}`)));
    replace(valSelect, h("option", { value: "" },
      `hold out ${fmtPct(hyperDefaults.validation_fraction, 0)} of the training rows`),
      datasets.map((d) => h("option", { value: d.id }, `${d.name} · ${fmtInt(d.row_count)} rows · ${d.id}`)));
    if (selected) trainSelect.value = selected;
  }
  fillSelects();

  const fileInput = h("input", { type: "file", id: "file-input", accept: ".jsonl,.ndjson,.json,.csv" });
  const drop = h("div", { id: "drop-zone", class: "drop", tabindex: "0" },
    h("strong", null, "Drop a dataset file here"),
    h("span", null, "JSON Lines or CSV · classification (text, label) or preference (prompt, chosen, rejected)"),
    h("label", { class: "button secondary", for: "file-input" }, "Choose a file"),
    fileInput);
  const report = h("div", { id: "dataset-report" });
  const stored = h("div", { id: "dataset-stored" });
  let pending = null; // {file, check}

  function labelBars(counts) {
    const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
    return h("div", { class: "bars labels" }, Object.entries(counts).map(([label, n]) => {
      const bar = h("div", { class: "bar" });
      bar.style.width = `${((100 * n) / total).toFixed(1)}%`;
      return h("div", { class: "bar-row", "data-label": label },
        h("span", { class: "bar-label" }, label),
        h("div", { class: "track" }, bar),
        h("span", { class: "bar-value" }, `${fmtInt(n)} (${fmtPct(n / total, 0)})`));
    }));
  }

  // check: the server's dry run (POST /v1/datasets/validate), the same rules as the upload.
  function showReport(file, check) {
    const ok = check.valid;
    const uploadBtn = h("button", { id: "upload-button", type: "button", disabled: !ok },
      "Upload dataset");
    const kindSelect = h("select", { id: "kind-select" },
      check.kind ? null : h("option", { value: "", selected: true, disabled: true }, "choose…"),
      ["classification", "preference"].map((k) => h("option", { value: k, selected: k === check.kind }, k)));
    kindSelect.addEventListener("change", () => checkFile(kindSelect.value));
    uploadBtn.addEventListener("click", () => upload(uploadBtn));
    const n = check.errors.length;
    const problems = `${fmtInt(n)}${check.truncated ? "+" : ""} problem${n === 1 && !check.truncated ? "" : "s"}`;
    replace(report, h("div", { class: ["report", ok ? "ok" : "bad"] },
      h("div", { class: "report-head" },
        h("strong", null, file.name), ` · ${fmtBytes(file.size)} · ${(check.format || "").toUpperCase()} · `,
        h("label", { for: "kind-select" }, "kind "), kindSelect),
      h("p", { id: "report-summary" },
        ok ? `${fmtInt(check.row_count)} rows, no problems found.`
          : `${problems}; ${fmtInt(check.row_count)} good rows. Fix the file and drop it again.`),
      check.label_counts && Object.keys(check.label_counts).length ? labelBars(check.label_counts) : null,
      n
        ? h("table", { class: "errors", id: "report-errors" },
          h("thead", null, h("tr", null, h("th", null, "Line"), h("th", null, "Problem"))),
          h("tbody", null, check.errors.map((e) =>
            h("tr", { "data-line": String(e.line ?? 0) }, h("td", { class: "num" }, e.line ? String(e.line) : "—"), h("td", null, e.message)))),
          check.truncated ? h("tfoot", null, h("tr", null, h("td", { colspan: "2" }, "… and possibly more: fix these and check again"))) : null)
        : null,
      h("div", { class: "row" }, uploadBtn)));
  }

  async function checkFile(kind) {
    const { file } = pending;
    replace(report, h("p", { class: "muted", id: "report-checking" }, `Checking ${file.name}…`));
    const form = new FormData();
    form.append("file", file, file.name);
    if (kind) form.append("kind", kind);
    try {
      const check = await api("/v1/datasets/validate", { method: "POST", form, signal: ctx.signal });
      if (pending.file !== file) return; // another file was dropped meanwhile
      pending.check = check;
      showReport(file, check);
    } catch (err) {
      if (ctx.signal.aborted || pending.file !== file) return;
      replace(report, errorBox(`The server refused the file: ${err.message}`));
    }
  }

  async function takeFile(file) {
    if (!file) return;
    clear(stored);
    pending = { file, check: null };
    await checkFile(null);
  }

  async function upload(button) {
    button.disabled = true;
    button.textContent = "Uploading…";
    const form = new FormData();
    form.append("file", pending.file, pending.file.name);
    form.append("kind", pending.check.kind);
    form.append("name", pending.file.name);
    try {
      const ds = await api("/v1/datasets", { method: "POST", form });
      datasets.unshift(ds);
      fillSelects(ds.id);
      replace(stored, h("div", { class: "alert success", id: "upload-result", "data-dataset": ds.id },
        h("strong", null, "Stored "), h("span", { class: "mono" }, ds.id),
        ` · ${ds.kind} · ${fmtInt(ds.row_count)} rows`,
        ds.label_counts ? ` · ${Object.entries(ds.label_counts).map(([k, v]) => `${k}: ${v}`).join(", ")}` : ""));
      clear(report);
      updateStart();
    } catch (err) {
      replace(stored, h("div", { class: "alert error", role: "alert" }, `The server refused the file: ${err.message}`));
      button.disabled = false;
      button.textContent = "Upload dataset";
    }
  }

  fileInput.addEventListener("change", () => takeFile(fileInput.files[0]));
  // A file dropped beside the zone must not make the browser leave the page to open it.
  const keepPage = (e) => {
    if (!drop.contains(e.target)) e.preventDefault();
  };
  window.addEventListener("dragover", keepPage);
  window.addEventListener("drop", keepPage);
  ctx.defer(() => {
    window.removeEventListener("dragover", keepPage);
    window.removeEventListener("drop", keepPage);
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takeFile(e.dataTransfer.files[0]);
  });

  // 2. method -----------------------------------------------------------------------------
  const methods = Object.fromEntries(catalog.data.map((m) => [m.type, m]));
  let methodType = "lora";
  const methodParams = h("div", { class: "fields", id: "method-params" });
  let paramFields = {};
  // The training defaults of the chosen method for the chosen dataset's kind ("auto" resolved).
  function taskDefaults() {
    const kind = datasets.find((d) => d.id === trainSelect.value)?.kind || "classification";
    return methods[methodType].tasks[kind].hyperparameters;
  }
  function showParams() {
    const props = methods[methodType].schema.properties;
    paramFields = Object.fromEntries(Object.entries(props).map(([key, prop]) => [key, schemaField(`mp-${key}`, prop)]));
    replace(methodParams, Object.keys(paramFields).length
      ? Object.values(paramFields).map((f) => f.el)
      : h("p", { class: "muted" }, "No settings for this method."));
    hp.learning_rate.input.placeholder = `auto (${taskDefaults().learning_rate})`;
  }
  const blurb = (text) => text.split("\n\n")[0].replaceAll("`", "");
  const methodCards = h("div", { class: "methods", role: "radiogroup" },
    catalog.data.map(({ type, description }) => {
      const radio = h("input", { type: "radio", name: "method", id: `method-${type}`, value: type, checked: type === methodType });
      radio.addEventListener("change", () => {
        methodType = type;
        showParams();
      });
      return h("label", { class: "method", for: `method-${type}`, title: description }, radio,
        h("span", { class: "method-name" }, METHOD_NAMES[type] || type), h("span", { class: "muted small" }, blurb(description)));
    }));

  // 3. hyperparameters --------------------------------------------------------------------
  const hyperProps = catalog.hyperparameters.schema.properties;
  const hp = Object.fromEntries(Object.entries(hyperProps).map(([key, prop]) =>
    [key, schemaField(`hp-${key}`, prop, key === "learning_rate" ? "auto" : null)]));
  const mainSettings = MAIN_SETTINGS.filter((k) => hp[k]);
  const moreSettings = Object.keys(hp).filter((k) => !mainSettings.includes(k));
  showParams();
  trainSelect.addEventListener("change", showParams);
  const nameInput = h("input", { id: "adapter-name", type: "text", placeholder: "generated", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]*", maxlength: 64 });
  const seedInput = h("input", { id: "seed", type: "number", min: 0, step: 1, placeholder: "random" });

  const startBtn = h("button", { id: "start-button", type: "button", class: "primary" }, "Start fine-tuning");
  const startError = h("div", { id: "start-error" });
  function updateStart() {
    startBtn.disabled = !trainSelect.value;
  }
  trainSelect.addEventListener("change", updateStart);
  updateStart();

  startBtn.addEventListener("click", async () => {
    clear(startError);
    const params = readFields(paramFields);
    const method = { type: methodType, hyperparameters: readFields(hp) };
    if (Object.keys(params).length) method[methodType] = params;
    const body = { training_file: trainSelect.value, method };
    if (valSelect.value) body.validation_file = valSelect.value;
    if (nameInput.value.trim()) body.adapter_name = nameInput.value.trim();
    if (seedInput.value !== "") body.seed = Number(seedInput.value);
    startBtn.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      replace(startError, h("div", { class: "alert error", role: "alert" },
        err.param ? `${err.param}: ${err.message}` : err.message));
      startBtn.disabled = false;
    }
  });

  view.append(
    pageHead("New fine-tuning job"),
    card("1 · Training data",
      drop, report, stored,
      h("div", { class: "fields" },
        h("div", { class: "field wide" }, h("label", { for: "dataset-select" }, "Training dataset"), trainSelect),
        h("div", { class: "field wide" }, h("label", { for: "validation-select" }, "Validation data"), valSelect))),
    card("2 · Method", methodCards, methodParams),
    card("3 · Hyperparameters",
      h("div", { class: "fields" }, mainSettings.map((k) => hp[k].el)),
      h("details", { id: "hp-more" }, h("summary", null, "More settings"),
        h("div", { class: "fields" }, moreSettings.map((k) => hp[k].el)))),
    card("4 · Start",
      h("div", { class: "fields" },
        h("div", { class: "field" }, h("label", { for: "adapter-name" }, "Adapter name"), nameInput),
        h("div", { class: "field" }, h("label", { for: "seed" }, "Seed"), seedInput)),
      startError,
      h("div", { class: "row" }, startBtn)),
  );
}

// --- adapters ---------------------------------------------------------------------------------

async function adaptersView(ctx) {
  document.title = "Adapters · loraplex";
  const adapters = await listAll("/v1/adapters", { signal: ctx.signal });
  const metric = (a, k) => a.metrics?.[k];
  view.append(pageHead("Adapters"),
    adapters.length
      ? h("div", { class: "card flush" }, h("table", { class: "list", id: "adapters-table" },
        headRow(["Name", "Method", "Task", "Trainable params#", "Trainable %#", "Size#", "Val. accuracy#", "Val. loss#", "Created"]),
        h("tbody", null, adapters.map((a) => h("tr", { "data-adapter": a.name },
          h("td", null, adapterLink(a.name), h("span", { class: "muted small" }, ` v${a.version}`)),
          h("td", null, methodLabel(a.method)),
          h("td", null, a.task),
          h("td", { class: "num" }, fmtInt(a.trainable_params)),
          h("td", { class: "num" }, fmtShare(a.trainable_pct)),
          h("td", { class: "num" }, fmtBytes(a.size_bytes)),
          h("td", { class: "num" }, fmtPct(metric(a, "val_accuracy"))),
          h("td", { class: "num" }, fmtNum(metric(a, "val_loss"))),
          h("td", { title: fmtTime(a.created_at) }, fmtAge(a.created_at)))))))
      : h("p", { class: "card muted" }, "No adapters yet: they appear when a job succeeds."));
}

async function adapterView(ctx, name) {
  document.title = `${name} · loraplex`;
  const a = await api(`/v1/adapters/${encodeURIComponent(name)}`, { signal: ctx.signal });
  const play = a.task === "reward" ? rewardPlayground(a) : classifyPlayground(a);
  view.append(
    h("div", { class: "page-head" },
      h("div", null, h("div", { class: "crumbs" }, h("a", { href: "#/adapters" }, "Adapters"), " / ", a.name),
        h("h1", null, a.name, h("span", { class: "muted" }, ` v${a.version}`))),
      h("div", { class: "actions" }, h("span", { class: "tag" }, a.task),
        a.source_job_id ? h("a", { class: "button secondary", href: `#/jobs/${encodeURIComponent(a.source_job_id)}` }, "Training job") : null)),
    h("div", { class: "stats" },
      [["Method", methodLabel(a.method)], ["Trainable parameters", fmtInt(a.trainable_params)],
        ["Trainable share", fmtShare(a.trainable_pct)], ["Size", fmtBytes(a.size_bytes)],
        ["Val. accuracy", fmtPct(a.metrics?.val_accuracy)]]
        .map(([k, v]) => h("div", { class: "stat" }, h("span", { class: "stat-label" }, k), h("span", { class: "stat-value" }, v)))),
    card(a.task === "reward" ? "Playground · which response is preferred?" : "Playground · label probabilities", play),
    h("div", { class: "grid two" },
      card("Validation metrics", metricsTable(a.metrics), perClassTable(a.metrics?.val_per_class)),
      card("Details", kv([
        ["labels", a.label_names ? a.label_names.join(", ") : "—"],
        ["base model", a.base_model],
        ["fingerprint", h("span", { class: "mono small" }, a.base_fingerprint.slice(0, 16))],
        ["created", fmtTime(a.created_at)],
        ["id", h("span", { class: "mono" }, a.id)],
      ]), h("details", null, h("summary", null, "Stored configuration"),
        h("pre", { class: "config" }, JSON.stringify(a.config, null, 2))))),
  );
}

function perClassTable(perClass) {
  if (!perClass || typeof perClass !== "object" || !Object.keys(perClass).length) return null;
  return h("table", { class: "per-class" },
    headRow(["Label", "Support#", "Precision#", "Recall#", "F1#"]),
    h("tbody", null, Object.entries(perClass).map(([label, m]) => h("tr", null,
      h("td", null, label), h("td", { class: "num" }, fmtInt(m.support)),
      h("td", { class: "num" }, fmtNum(m.precision, 3)), h("td", { class: "num" }, fmtNum(m.recall, 3)),
      h("td", { class: "num" }, fmtNum(m.f1, 3))))));
}

function probBars(probabilities, predicted) {
  return h("div", { class: "bars" }, Object.entries(probabilities)
    .sort(([, x], [, y]) => y - x)
    .map(([label, p]) => {
      const bar = h("div", { class: "bar" });
      bar.style.width = `${(p * 100).toFixed(2)}%`;
      return h("div", { class: ["bar-row", label === predicted && "top"], "data-label": label, "data-prob": String(p) },
        h("span", { class: "bar-label" }, label),
        h("div", { class: "track" }, bar),
        h("span", { class: "bar-value" }, fmtPct(p)));
    }));
}

function classifyPlayground(a) {
  const isLora = a.method === "lora";
  const input = h("textarea", { id: "playground-input", rows: 4, placeholder: "One text per line" });
  input.value = "A warm, funny and beautifully acted film.\nTedious, overlong and badly written.";
  let mode = "auto";
  const modes = h("div", { class: "modes", role: "radiogroup" },
    h("span", { class: "muted" }, "LoRA weights: "),
    [["auto", "auto"], ["unmerged", "unmerged (shared batch)"], ["merged", "merged into the encoder"]].map(([m, text]) => {
      const r = h("input", { type: "radio", name: "mode", id: `mode-${m}`, value: m, checked: m === mode, disabled: !isLora });
      r.addEventListener("change", () => {
        mode = m;
      });
      return h("label", { for: `mode-${m}` }, r, ` ${text}`);
    }),
    isLora ? null : h("span", { class: "muted small" }, " (only LoRA adapters merge)"));
  const button = h("button", { id: "predict-button", type: "button", class: "primary" }, "Predict");
  const out = h("div", { id: "predictions" });
  button.addEventListener("click", async () => {
    const texts = input.value.split("\n").map((t) => t.trim()).filter(Boolean);
    if (!texts.length) return;
    button.disabled = true;
    try {
      const res = await api(`/predict?adapter=${encodeURIComponent(a.name)}&mode=${mode}`, {
        method: "POST", json: { inputs: texts },
      });
      replace(out, res.predictions.map((p, i) => h("div", { class: "prediction", "data-index": String(i) },
        h("div", { class: "prediction-head" }, h("q", null, texts[i]), " → ",
          p.label !== undefined ? h("strong", { class: "predicted" }, p.label) : h("strong", null, `reward ${fmtNum(p.reward)}`)),
        p.probabilities ? probBars(p.probabilities, p.label) : null)),
      h("p", { class: "muted small", id: "predict-mode" }, `mode: ${res.mode}`));
    } catch (err) {
      replace(out, errorBox(err));
    } finally {
      button.disabled = false;
    }
  });
  return h("div", { class: "stack" }, h("label", { for: "playground-input" }, "Texts"), input, modes,
    h("div", { class: "row" }, button), out);
}

function rewardPlayground(a) {
  const prompt = h("input", { id: "reward-prompt", type: "text", placeholder: "Prompt (optional)" });
  const ra = h("textarea", { id: "response-a", rows: 3, placeholder: "Response A" });
  const rb = h("textarea", { id: "response-b", rows: 3, placeholder: "Response B" });
  const button = h("button", { id: "compare-button", type: "button", class: "primary" }, "Compare");
  const out = h("div", { id: "comparison" });
  button.addEventListener("click", async () => {
    if (!ra.value.trim() || !rb.value.trim()) return;
    button.disabled = true;
    const body = { response_a: ra.value, response_b: rb.value };
    if (prompt.value.trim()) body.prompt = prompt.value;
    try {
      const res = await api(`/reward/compare?adapter=${encodeURIComponent(a.name)}`, { method: "POST", json: body });
      const bar = h("div", { class: "bar" });
      bar.style.width = `${(res.p_a_preferred * 100).toFixed(2)}%`;
      replace(out, h("div", { class: "comparison", "data-p": String(res.p_a_preferred) },
        h("div", { class: "bar-row top" }, h("span", { class: "bar-label" }, "P(A preferred)"),
          h("div", { class: "track" }, bar), h("span", { class: "bar-value", id: "p-a" }, fmtPct(res.p_a_preferred))),
        h("p", null, `Preferred: `, h("strong", { id: "preferred" }, res.preferred.toUpperCase()),
          ` · reward A ${fmtNum(res.reward_a)} · reward B ${fmtNum(res.reward_b)}`)));
    } catch (err) {
      replace(out, errorBox(err));
    } finally {
      button.disabled = false;
    }
  });
  return h("div", { class: "stack" },
    h("label", { for: "reward-prompt" }, "Prompt"), prompt,
    h("div", { class: "grid two" },
      h("div", { class: "stack" }, h("label", { for: "response-a" }, "Response A"), ra),
      h("div", { class: "stack" }, h("label", { for: "response-b" }, "Response B"), rb)),
    h("div", { class: "row" }, button), out);
}

// --- compare ----------------------------------------------------------------------------------

async function compareView(ctx, datasetId) {
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
