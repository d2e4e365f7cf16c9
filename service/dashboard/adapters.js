// #/adapters (the list) and #/adapters/<name> (one adapter: stats, playground, metrics, details).

import { api, listAll } from "./api.js";
import { fmtAge, fmtBytes, fmtInt, fmtNum, fmtPct, fmtShare, fmtTime, h } from "./dom.js";
import { classifyPlayground, rewardPlayground } from "./playground.js";
import { methodLabel } from "./records.js";
import { adapterLink, card, headRow, kv, metricsTable, pageHead } from "./widgets.js";

export async function adaptersView(ctx) {
  const { view } = ctx;
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

export async function adapterView(ctx, name) {
  const { view } = ctx;
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
