// An adapter's playground: texts in, label probabilities (a classifier) or a reply each (a chat
// or DPO adapter) out (/predict, with LoRA's merged or unmerged choice), or, for a reward model,
// two responses in and P(A preferred) out.

import { api } from "./api.js";
import { fmtNum, fmtPct, h, replace } from "./dom.js";
import { errorBox } from "./widgets.js";

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

// What /predict answered for one text: a label, a chat adapter's reply, or a reward.
function outcome(p) {
  if (p.label !== undefined) return h("strong", { class: "predicted" }, p.label);
  if (p.text !== undefined) return h("span", { class: "reply" }, p.text);
  return h("strong", null, `reward ${fmtNum(p.reward)}`);
}

export function classifyPlayground(a) {
  const isLora = a.method === "lora";
  const input = h("textarea", { id: "playground-input", rows: 4, placeholder: "One text per line" });
  input.value = "A warm, funny and beautifully acted film.\nTedious, overlong and badly written.";
  let mode = "auto";
  const modes = h("div", { class: "modes", role: "radiogroup" },
    h("span", { class: "muted" }, "LoRA weights: "),
    [["auto", "auto"], ["unmerged", "unmerged (shared batch)"], ["merged", "merged into the base"]].map(([m, text]) => {
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
          outcome(p)),
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

export function rewardPlayground(a) {
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
