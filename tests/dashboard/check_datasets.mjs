// Runs the dashboard's in-browser dataset check (service/dashboard/validate.js) under node:
// reads [{name, kind, text}] as JSON on stdin, writes one result per case as JSON on stdout.
// Used by tests/service/test_dashboard_checks.py to hold it to the server's rules.

import { checkDataset, decodeFile } from "../../service/dashboard/validate.js";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(({ name, kind, text, base64 }) => {
  if (base64 !== undefined) {
    const decoded = decodeFile(Buffer.from(base64, "base64"));
    if (decoded.error) return { errors: [decoded.error], rows: 0, kind, labelCounts: null };
    text = decoded.text;
  }
  const r = checkDataset(text, name, kind);
  return { errors: r.errors, rows: r.rows, kind: r.kind, labelCounts: r.labelCounts };
});
process.stdout.write(JSON.stringify(out));
