// Check a dataset file in the browser before it is uploaded, with the server's rules
// (service/datasets/validation.py), but reporting *every* bad line instead of the first.
// The server checks again on upload; it stays the authority.

const MAX_ERRORS = 500;
const MAX_LABEL_CHARS = 256;
const MAX_TEXT_CHARS = 100000;

export const FIELDS = {
  classification: { required: ["text", "label"], optional: ["text_pair"] },
  preference: { required: ["chosen", "rejected"], optional: ["prompt"] },
};

function typeName(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (typeof v === "number") return Number.isInteger(v) ? "integer" : "number";
  if (typeof v === "boolean") return "boolean";
  return typeof v; // string, object
}

export function detectFormat(name, text) {
  const n = (name || "").toLowerCase();
  if (n.endsWith(".csv")) return "csv";
  if (n.endsWith(".jsonl") || n.endsWith(".ndjson") || n.endsWith(".json")) return "jsonl";
  return text.trimStart().startsWith("{") ? "jsonl" : "csv";
}

export function detectKind(objects) {
  for (const o of objects.slice(0, 20)) {
    if ("chosen" in o || "rejected" in o) return "preference";
    if ("text" in o || "label" in o) return "classification";
  }
  return "classification";
}

function* jsonlRecords(text, errors) {
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i].replace(/\r$/, "");
    if (!line.trim()) continue;
    let obj;
    try {
      obj = JSON.parse(line);
    } catch (e) {
      errors.push({ line: i + 1, message: `invalid JSON (${e.message})` });
      continue;
    }
    if (typeName(obj) !== "object") {
      errors.push({
        line: i + 1,
        message: `expected a JSON object, got ${typeName(obj)} (JSON Lines holds one object per line)`,
      });
      continue;
    }
    yield { line: i + 1, obj };
  }
}

// RFC 4180 records; each with the line number where it ends (as Python's csv.reader reports).
function csvRows(text) {
  const rows = [];
  let row = [];
  let cell = "";
  let quoted = false;
  let line = 1;
  let touched = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') {
          cell += '"';
          i += 1;
        } else quoted = false;
      } else {
        if (c === "\n") line += 1;
        cell += c;
      }
    } else if (c === '"') {
      quoted = true;
      touched = true;
    } else if (c === ",") {
      row.push(cell);
      cell = "";
      touched = true;
    } else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i += 1;
      row.push(cell);
      rows.push({ line, cells: row });
      row = [];
      cell = "";
      touched = false;
      line += 1;
    } else {
      cell += c;
      touched = true;
    }
  }
  if (touched || cell) {
    row.push(cell);
    rows.push({ line, cells: row });
  }
  return { rows, unterminated: quoted ? line : null };
}

function* csvRecords(text, kind, errors) {
  const { rows, unterminated } = csvRows(text);
  let header = null;
  for (const { line, cells } of rows) {
    if (!cells.length || cells.every((c) => !c.trim())) continue;
    if (header === null) {
      header = cells.map((c) => c.trim().toLowerCase());
      const missing = FIELDS[kind].required.filter((f) => !header.includes(f));
      if (missing.length) {
        errors.push({
          line,
          message: `header has no '${missing[0]}' column (a ${kind} CSV needs: ${FIELDS[kind].required.join(", ")})`,
        });
        return;
      }
      continue;
    }
    if (cells.length !== header.length) {
      errors.push({
        line,
        message: `expected ${header.length} fields as in the header, got ${cells.length}`,
      });
      continue;
    }
    const obj = {};
    header.forEach((name, j) => {
      obj[name] = cells[j];
    });
    yield { line, obj };
  }
  if (unterminated) errors.push({ line: unterminated, message: "unterminated quoted field" });
}

function checkText(obj, field, required, problems) {
  const v = obj[field];
  if (v === undefined || v === null || (!required && v === "")) {
    if (required) problems.push(`missing required field '${field}'`);
    return;
  }
  if (typeof v !== "string") {
    problems.push(`field '${field}' must be a string, got ${typeName(v)}`);
  } else if (!v.trim()) {
    problems.push(`field '${field}' must not be empty`);
  } else if (v.length > MAX_TEXT_CHARS) {
    problems.push(`field '${field}' is longer than ${MAX_TEXT_CHARS} characters`);
  }
}

function checkLabel(obj, problems) {
  const v = obj.label;
  if (v === undefined || v === null) {
    problems.push("missing required field 'label'");
    return null;
  }
  if (typeof v === "number" && Number.isInteger(v)) return String(v);
  if (typeof v !== "string") {
    problems.push(`field 'label' must be a string or an integer, got ${typeName(v)}`);
    return null;
  }
  const label = v.trim();
  if (!label) problems.push("field 'label' must not be empty");
  else if (label.length > MAX_LABEL_CHARS) {
    problems.push(`field 'label' is longer than ${MAX_LABEL_CHARS} characters`);
  }
  return label || null;
}

/**
 * Check a file's text. kind: "classification" | "preference" | null (guess from fields).
 * Returns {format, kind, rows, labelCounts, errors: [{line, message}], moreErrors, preview}.
 */
export function checkDataset(text, name, kind = null) {
  const errors = [];
  let moreErrors = 0;
  const push = (e) => {
    if (errors.length < MAX_ERRORS) errors.push(e);
    else moreErrors += 1;
  };
  const sink = { push };
  const body = text.replace(/^\uFEFF/, "");
  const format = detectFormat(name, body);
  if (!body.trim()) {
    return { format, kind: kind || "classification", rows: 0, labelCounts: null,
      errors: [{ line: 1, message: "file is empty" }], moreErrors: 0, preview: [] };
  }
  let records;
  if (format === "jsonl") {
    records = [...jsonlRecords(body, sink)];
    kind = kind || detectKind(records.map((r) => r.obj));
  } else {
    if (!kind) {
      const first = body.split(/\r?\n/, 1)[0].toLowerCase();
      kind = first.includes("chosen") ? "preference" : "classification";
    }
    records = [...csvRecords(body, kind, sink)];
  }
  const counts = new Map();
  let rows = 0;
  for (const { line, obj } of records) {
    const problems = [];
    if (kind === "classification") {
      checkText(obj, "text", true, problems);
      const label = checkLabel(obj, problems);
      checkText(obj, "text_pair", false, problems);
      if (!problems.length) counts.set(label, (counts.get(label) || 0) + 1);
    } else {
      checkText(obj, "chosen", true, problems);
      checkText(obj, "rejected", true, problems);
      checkText(obj, "prompt", false, problems);
      if (!problems.length && obj.chosen === obj.rejected) {
        problems.push("'chosen' and 'rejected' are identical");
      }
    }
    if (problems.length) push({ line, message: problems.join("; ") });
    else rows += 1;
  }
  errors.sort((a, b) => a.line - b.line);
  let labelCounts = null;
  if (kind === "classification") {
    labelCounts = Object.fromEntries([...counts.entries()].sort(([a], [b]) => (a < b ? -1 : 1)));
    if (rows && counts.size < 2 && !errors.length) {
      push({ line: 0, message: `a classification dataset needs at least 2 classes; every row has label '${[...counts.keys()][0]}'` });
    }
  }
  if (!rows && !errors.length) push({ line: 0, message: "dataset is empty: it has no rows" });
  const preview = records.slice(0, 3).map((r) => r.obj);
  return { format, kind, rows, labelCounts, errors, moreErrors, preview };
}

/** Strict UTF-8 decoding; on failure, the line of the first bad byte. */
export function decodeFile(buffer) {
  try {
    return { text: new TextDecoder("utf-8", { fatal: true }).decode(buffer) };
  } catch {
    const loose = new TextDecoder("utf-8").decode(buffer);
    const at = loose.indexOf("\uFFFD");
    const line = loose.slice(0, Math.max(0, at)).split("\n").length;
    return { error: { line, message: "file is not valid UTF-8" } };
  }
}
