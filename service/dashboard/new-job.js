// #/new: upload or pick a dataset (checked by the server's dry run), choose a method and its
// settings (the form is built from GET /v1/methods) and start a fine-tuning job.

import { api, listAll } from "./api.js";
import { clear, fmtBytes, fmtInt, fmtPct, h, replace } from "./dom.js";
import { METHOD_NAMES } from "./records.js";
import { readFields, schemaField } from "./schema-field.js";
import { card, errorBox, pageHead } from "./widgets.js";

// Shown up front; the other training settings sit under "More settings".
const MAIN_SETTINGS = ["n_epochs", "max_steps", "batch_size", "learning_rate", "warmup_ratio", "lr_scheduler",
  "eval_every_steps", "early_stopping_patience", "max_seq_length"];

export async function newJobView(ctx) {
  const { view } = ctx;
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
    h("span", null, "JSON Lines or CSV · classification (text, label) or preference (prompt, chosen, rejected); JSON Lines · OpenAI chat (messages) or dpo (input, preferred_output, non_preferred_output)"),
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
      ["classification", "preference", "chat", "dpo"].map((k) => h("option", { value: k, selected: k === check.kind }, k)));
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
    startBtn.disabled = true;
    try {
      // Inside the try: a field that cannot be sent is shown like the server's field errors.
      const params = readFields(paramFields, `method.${methodType}`);
      const method = { type: methodType, hyperparameters: readFields(hp, "method.hyperparameters") };
      if (Object.keys(params).length) method[methodType] = params;
      const body = { training_file: trainSelect.value, method };
      if (valSelect.value) body.validation_file = valSelect.value;
      if (nameInput.value.trim()) body.adapter_name = nameInput.value.trim();
      // 1e400 empties a number box (badInput): a random seed would be used without a word.
      if (seedInput.validity.badInput) {
        throw Object.assign(new Error("must be a whole number"), { param: "seed" });
      }
      if (seedInput.value !== "") body.seed = Number(seedInput.value);
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      // The server's messages start with the field already ("seed: ..."): named once.
      const named = !err.param || err.message.startsWith(`${err.param}:`);
      replace(startError, h("div", { class: "alert error", role: "alert" },
        named ? err.message : `${err.param}: ${err.message}`));
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
