// Form fields built from the JSON Schema that GET /v1/methods serves for core's configs.

import { h } from "./dom.js";

const NOT_FINITE = "must be a finite number";

// JSON has no Infinity or NaN: JSON.stringify sends them as null, so a learning_rate of 1e400
// (Infinity once parsed) reached the server as null and the job trained at the default.
function finite(value) {
  if (typeof value === "number") return Number.isFinite(value);
  return value === null || typeof value !== "object" || Object.values(value).every(finite);
}

// One form field from a JSON Schema property of GET /v1/methods (core's config field): the
// input fits the type, starts at core's default and carries its range and description.
// read() gives the value to send, or undefined when the field is blank or left at the default
// (the job then records only what was chosen; the server fills in the rest).
export function schemaField(id, prop, placeholder = null) {
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
    // A number box holding what the browser cannot read as a finite number (1e400) has the
    // value "" and badInput: not a blank field to leave at the default.
    if (input.validity.badInput) throw new Error(NOT_FINITE);
    const v = input.value.trim();
    const value = v === "" || v === start ? undefined : parse(v);
    if (!finite(value)) throw new Error(NOT_FINITE);
    return value;
  };
  // Labelled with the API's own name for the setting, as the job page shows it.
  const name = id.replace(/^(mp|hp)-/, "");
  const hint = h("span", { class: "hint" }, prop.description || "");
  const el = input.type === "checkbox"
    ? h("div", { class: "field" }, h("label", { class: "check mono" }, input, name), hint)
    : h("div", { class: "field" }, h("label", { for: id, class: "mono" }, name), input, hint);
  return { input, el, read };
}

// The fields' values to send. A value that cannot be sent throws an error whose param is its
// place in the request (`${at}.${key}`), as the server's 422 would name it.
export function readFields(fields, at) {
  const out = {};
  for (const [key, f] of Object.entries(fields)) {
    let v;
    try {
      v = f.read();
    } catch (err) {
      err.param = `${at}.${key}`;
      throw err;
    }
    if (v !== undefined) out[key] = v;
  }
  return out;
}
