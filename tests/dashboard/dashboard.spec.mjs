// The dashboard in a real browser: Debian's headless Chromium driven by playwright-core,
// against a real `loraplex serve` (started by tests/e2e/test_dashboard.py, which passes
// BASE_URL and API_KEY). Any console error, page error, failed request or HTTP error the
// page meets fails the run, except the few a step expects on purpose. Screenshots of every
// page go to ARTIFACTS_DIR.
//
//   BASE_URL=http://127.0.0.1:8000 API_KEY=lpx_... node --test dashboard.spec.mjs

import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const BASE_URL = process.env.BASE_URL;
const API_KEY = process.env.API_KEY;
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const ARTIFACTS = process.env.ARTIFACTS_DIR || fileURLToPath(new URL("../../artifacts/dashboard/", import.meta.url));
const FIXTURES = fileURLToPath(new URL("../fixtures/", import.meta.url));
if (!BASE_URL || !API_KEY) throw new Error("set BASE_URL and API_KEY");
mkdirSync(ARTIFACTS, { recursive: true });

// --- data -------------------------------------------------------------------------------------

const rtLines = readFileSync(join(FIXTURES, "rotten_tomatoes_small.jsonl"), "utf8").split("\n").filter(Boolean);
const TRAIN = rtLines.slice(0, 200).join("\n") + "\n";
const trainLabels = {};
for (const line of rtLines.slice(0, 200)) {
  const { label } = JSON.parse(line);
  trainLabels[label] = (trainLabels[label] || 0) + 1;
}
const BAD = [
  JSON.stringify({ text: "fine", label: "fresh" }),
  "{not json",
  JSON.stringify({ text: "ok", label: "rotten" }),
  JSON.stringify({ text: "", label: "fresh" }),
  JSON.stringify({ text: "no label here" }),
  "",
].join("\n");
const PREFS = readFileSync(join(FIXTURES, "rt_preference_small.jsonl"), "utf8")
  .split("\n").filter(Boolean).slice(0, 120)
  .map((l) => {
    const { prompt, chosen, rejected } = JSON.parse(l);
    return { prompt, chosen, rejected };
  });

// --- the API, from outside the browser --------------------------------------------------------

async function apiCall(path, { method = "GET", json } = {}) {
  const resp = await fetch(BASE_URL + path, {
    method,
    headers: { Authorization: `Bearer ${API_KEY}`, ...(json ? { "Content-Type": "application/json" } : {}) },
    body: json ? JSON.stringify(json) : undefined,
  });
  const body = await resp.json();
  assert.ok(resp.ok, `${method} ${path}: ${resp.status} ${JSON.stringify(body)}`);
  return body;
}

async function waitJob(id, timeoutMs = 300_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = await apiCall(`/v1/fine_tuning/jobs/${id}`);
    if (["succeeded", "failed", "cancelled"].includes(job.status)) return job;
    if (Date.now() > deadline) throw new Error(`job ${id} still ${job.status}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

// --- the browser ------------------------------------------------------------------------------

let browser;
let page;
let profileDir;
const problems = [];
let allowed = []; // [{kind, re}] failures a step provokes on purpose

function report(kind, text) {
  const i = allowed.findIndex((a) => a.kind === kind && a.re.test(text));
  if (i >= 0) {
    allowed.splice(i, 1);
    return;
  }
  problems.push(`${kind}: ${text}`);
}

function assertClean(step) {
  const found = problems.splice(0);
  assert.deepEqual(found, [], `${step}: the page logged errors or had failed requests`);
}

async function shot(name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

async function go(hash) {
  await page.evaluate((h) => {
    location.hash = h;
  }, hash);
}

before(async () => {
  profileDir = await mkdtemp(join(tmpdir(), "lpx-chromium-"));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--disk-cache-dir=${join(profileDir, "cache")}`,
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, locale: "en-GB" });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on("console", (msg) => {
    if (msg.type() === "error") report("console", `${msg.text()} (${msg.location().url})`);
  });
  page.on("pageerror", (err) => report("pageerror", String(err)));
  page.on("requestfailed", (req) => {
    const why = req.failure()?.errorText || "failed";
    // A job page stops its event stream when the user leaves it: that is an abort we cause.
    if (why === "net::ERR_ABORTED" && req.url().includes("/events/stream")) return;
    report("requestfailed", `${req.method()} ${req.url()} ${why}`);
  });
  page.on("response", (resp) => {
    if (resp.status() >= 400) report("http", `${resp.status()} ${resp.request().method()} ${resp.url()}`);
  });
});

after(async () => {
  await browser?.close();
  if (profileDir) await rm(profileDir, { recursive: true, force: true });
});

// --- the walk-through -------------------------------------------------------------------------

describe("loraplex dashboard", { concurrency: 1 }, () => {
  const state = {};

  test("serves the page and signs in with a key kept out of URLs", async () => {
    const resp = await page.goto(`${BASE_URL}/`);
    assert.equal(resp.status(), 200);
    assert.match(resp.headers()["content-security-policy"], /script-src 'self'/);
    await page.waitForURL(/\/dashboard\/#\/login$/);
    await page.locator("#api-key").waitFor();
    await shot("01-login");

    // A wrong key is refused (one 401 and the console line Chromium writes for it).
    allowed = [
      { kind: "http", re: /^401 GET .*\/v1\/fine_tuning\/jobs\?limit=1$/ },
      { kind: "console", re: /status of 401/ },
    ];
    await page.fill("#api-key", "lpx_not-a-real-key");
    await page.click("#sign-in");
    await page.getByText("That key was not accepted.").waitFor();
    assert.deepEqual(allowed, [], "the wrong key was refused with a 401");
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);

    await page.fill("#api-key", API_KEY);
    await page.click("#sign-in");
    await page.waitForURL(/#\/jobs$/);
    await page.locator("#new-job-link").waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem("loraplex.apiKey")), API_KEY);
    assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing in localStorage");
    assert.ok(!page.url().includes(API_KEY));
    await shot("02-jobs-empty");
    assertClean("sign in");
  });

  test("checks a dataset in the browser, uploads it and starts a job", async () => {
    await page.click("#new-job-link");
    await page.locator("#drop-zone").waitFor();

    // A broken file: the server's dry run reports every bad line, and nothing is stored.
    const storedBefore = (await apiCall("/v1/datasets")).data.length;
    await page.setInputFiles("#file-input", { name: "broken.jsonl", mimeType: "application/jsonl", buffer: Buffer.from(BAD) });
    await page.locator("#report-errors").waitFor();
    const lines = await page.$$eval("#report-errors tbody tr", (rows) => rows.map((r) => r.dataset.line));
    assert.deepEqual(lines, ["2", "4", "5"]);
    assert.match(await page.textContent("#report-errors"), /invalid JSON.*must not be empty.*missing required field 'label'/s);
    assert.ok(await page.isDisabled("#upload-button"));
    assert.equal((await apiCall("/v1/datasets")).data.length, storedBefore);
    await shot("03-new-job-file-errors");

    // The good file, dropped onto the zone.
    const dt = await page.evaluateHandle((text) => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([text], "rt-200.jsonl", { type: "application/jsonl" }));
      return transfer;
    }, TRAIN);
    await page.dispatchEvent("#drop-zone", "dragover", { dataTransfer: dt });
    await page.dispatchEvent("#drop-zone", "drop", { dataTransfer: dt });
    await page.waitForFunction(() => document.querySelector("#report-summary")?.textContent.includes("200 rows"));
    const bars = await page.$$eval("#dataset-report .bar-row", (rows) =>
      Object.fromEntries(rows.map((r) => [r.dataset.label, r.querySelector(".bar-value").textContent])));
    for (const [label, n] of Object.entries(trainLabels)) assert.match(bars[label], new RegExp(`^${n} `));
    await shot("04-new-job-file-checked");

    await page.click("#upload-button");
    await page.locator("#upload-result").waitFor();
    state.dataset = await page.getAttribute("#upload-result", "data-dataset");
    const ds = await apiCall(`/v1/datasets/${state.dataset}`);
    assert.equal(ds.row_count, 200);
    assert.deepEqual(ds.label_counts, trainLabels);
    assert.equal(await page.inputValue("#dataset-select"), state.dataset);

    // The form is built from GET /v1/methods (core's configs): every LoRA setting and every
    // training setting has an input that starts at core's default, hand-listed or not.
    const catalog = await apiCall("/v1/methods");
    const loraInfo = catalog.data.find((m) => m.type === "lora");
    await page.check("#method-lora");
    assert.equal(await page.inputValue("#mp-alpha"), "16");
    for (const [key, value] of Object.entries(loraInfo.defaults)) {
      const shown = await page.locator(`#mp-${key}`).evaluate((el) => (el.type === "checkbox" ? el.checked : el.value));
      const expected = typeof value === "boolean" ? value : value === null ? "" : Array.isArray(value) ? JSON.stringify(value) : String(value);
      assert.equal(shown, expected, `mp-${key}`);
    }
    for (const key of Object.keys(catalog.hyperparameters.schema.properties)) {
      assert.equal(await page.locator(`#hp-${key}`).count(), 1, `hp-${key}`);
    }
    assert.equal(await page.inputValue("#hp-max_grad_norm"), String(catalog.hyperparameters.defaults.max_grad_norm));
    assert.equal(await page.inputValue("#hp-warmup_steps"), "");
    assert.equal(await page.getAttribute("#hp-learning_rate", "placeholder"),
      `auto (${loraInfo.tasks.classification.hyperparameters.learning_rate})`);
    await page.check("#method-full");
    assert.equal(await page.getAttribute("#hp-learning_rate", "placeholder"), "auto (0.00005)");
    await page.check("#method-lora");
    await page.fill("#mp-r", "4");
    await page.fill("#mp-alpha", "8");
    await page.click("#hp-more summary");
    await page.fill("#hp-warmup_steps", "3");
    await page.fill("#hp-max_steps", "30");
    await page.fill("#hp-batch_size", "8");
    await page.fill("#hp-eval_every_steps", "10");
    await page.fill("#adapter-name", "dash-lora");
    await page.fill("#seed", "7");
    await shot("05-new-job-form");
    await page.click("#start-button");
    await page.waitForURL(/#\/jobs\/ftjob-/);
    state.jobId = decodeURIComponent(page.url().split("#/jobs/")[1]);
    const job = await apiCall(`/v1/fine_tuning/jobs/${state.jobId}`);
    assert.equal(job.method.type, "lora");
    // Only what was changed is sent; the server fills in core's defaults for the rest.
    assert.deepEqual(job.method.lora, { r: 4, alpha: 8 });
    assert.equal(job.hyperparameters.warmup_steps, 3);
    assert.equal(job.hyperparameters.max_steps, 30);
    assert.equal(job.hyperparameters.batch_size, 8);
    assert.equal(job.seed, 7);

    // Queued behind it (one worker): another method on the same data, and a reward model.
    state.fxJob = (await apiCall("/v1/fine_tuning/jobs", {
      method: "POST",
      json: { training_file: state.dataset, adapter_name: "dash-fx", seed: 7,
        method: { type: "feature_extraction", hyperparameters: { max_steps: 30, batch_size: 8 } } },
    })).id;
    const prefs = await apiCall("/v1/datasets", { method: "POST", json: { kind: "preference", name: "prefs", records: PREFS } });
    state.rewardJob = (await apiCall("/v1/fine_tuning/jobs", {
      method: "POST",
      // OpenAI's method type, as the SDK sends it: the job trains LoRA and echoes "dpo".
      json: { training_file: prefs.id, adapter_name: "dash-reward", seed: 7,
        method: { type: "dpo", dpo: { hyperparameters: { batch_size: 8 } }, hyperparameters: { max_steps: 10 } } },
    })).id;
    assertClean("new job");
  });

  test("the job page draws the loss curve live and shows the job succeed", { timeout: 300_000 }, async () => {
    await page.locator("#loss-chart svg").waitFor();
    const seen = [];
    let midShot = false;
    const deadline = Date.now() + 240_000;
    for (;;) {
      const { count, status } = await page.evaluate(() => ({
        count: Number(document.querySelector('#loss-chart g[data-series="training loss"]')?.dataset.count || 0),
        status: document.querySelector(".page-head .status")?.dataset.status,
      }));
      if (count && seen.at(-1) !== count) seen.push(count);
      if (!midShot && count >= 3 && status === "running") {
        midShot = true;
        await shot("06-job-running");
      }
      if (["succeeded", "failed", "cancelled"].includes(status)) break;
      assert.ok(Date.now() < deadline, `job still ${status}`);
      await new Promise((r) => setTimeout(r, 150));
    }
    await page.waitForFunction(() => document.querySelector("#live")?.dataset.final);
    assert.equal(await page.getAttribute(".page-head .status", "data-status"), "succeeded");
    assert.ok(seen.length >= 3, `the curve gained points while the job ran: ${seen}`);
    assert.deepEqual(seen, [...seen].sort((a, b) => a - b));

    // What is drawn is what the API reports.
    const events = (await apiCall(`/v1/fine_tuning/jobs/${state.jobId}/events?order=asc&limit=100`)).data;
    const lossEvents = events.filter((e) => e.type === "metrics" && typeof e.data?.train_loss === "number");
    const valEvents = events.filter((e) => e.type === "metrics" && typeof e.data?.val_accuracy === "number");
    assert.equal(lossEvents.length, 30);
    assert.ok(valEvents.length >= 3, "validated at steps 10, 20, 30");
    const drawn = await page.evaluate(() => ({
      loss: Number(document.querySelector('#loss-chart g[data-series="training loss"]').dataset.count),
      acc: Number(document.querySelector('#val-chart g[data-series="accuracy"]').dataset.count),
      log: document.querySelectorAll("#event-log tbody tr").length,
    }));
    assert.deepEqual(drawn, { loss: lossEvents.length, acc: valEvents.length, log: events.length });
    assert.ok(await page.isHidden("#cancel-job"));
    assert.match(await page.textContent("#job-progress"), /30\/30/);
    await page.locator("#open-adapter").waitFor();
    await shot("07-job-succeeded");
    assertClean("job page");
  });

  test("the jobs list shows status, method, progress and age", async () => {
    await go("#/jobs");
    const row = page.locator(`#jobs-table tr[data-job="${state.jobId}"]`);
    await row.waitFor();
    const text = await row.textContent();
    assert.match(text, /dash-lora/);
    assert.match(text, /LoRA r=4/);
    assert.match(text, /succeeded/);
    assert.match(text, /30\/30/);
    assert.match(text, /just now|min ago/);
    assert.equal(await page.locator("#jobs-table tbody tr").count(), 3);
    const reward = page.locator(`#jobs-table tr[data-job="${state.rewardJob}"]`);
    assert.match(await reward.textContent(), /LoRA( r=\d+)? \(OpenAI dpo\)/);
    await shot("08-jobs");
    assertClean("jobs list");
  });

  test("the adapters list shows method, parameters, size and metrics", async () => {
    await go("#/adapters");
    const row = page.locator('#adapters-table tr[data-adapter="dash-lora"]');
    await row.waitFor();
    const adapter = await apiCall("/v1/adapters/dash-lora");
    const text = await row.textContent();
    assert.match(text, /LoRA/);
    assert.ok(text.includes(adapter.trainable_params.toLocaleString("en-US")), text);
    assert.match(text, /%/);
    await shot("09-adapters");
    assertClean("adapters list");
  });

  test("the playground shows the same probabilities as the API", async () => {
    await page.click('#adapters-table tr[data-adapter="dash-lora"] a');
    await page.locator("#predict-button").waitFor();
    const texts = ["A funny, moving and beautifully acted film.", "Dull, overlong and badly written.", "It exists."];
    await page.fill("#playground-input", texts.join("\n"));
    for (const mode of ["merged", "unmerged"]) {
      await page.check(`#mode-${mode}`);
      await page.click("#predict-button");
      await page.waitForFunction((m) => document.querySelector("#predict-mode")?.textContent === `mode: ${m}`, mode);
      const shown = await page.$$eval("#predictions .prediction", (preds) => preds.map((p) =>
        Object.fromEntries([...p.querySelectorAll(".bar-row")].map((r) => [r.dataset.label, Number(r.dataset.prob)]))));
      const api = await apiCall(`/predict?adapter=dash-lora&mode=${mode}`, { method: "POST", json: { inputs: texts } });
      assert.equal(shown.length, texts.length);
      api.predictions.forEach((p, i) => {
        assert.deepEqual(Object.keys(shown[i]).sort(), Object.keys(p.probabilities).sort());
        for (const [label, prob] of Object.entries(p.probabilities)) {
          assert.ok(Math.abs(shown[i][label] - prob) < 1e-5, `${mode} ${i} ${label}: ${shown[i][label]} vs ${prob}`);
        }
      });
    }
    await shot("10-playground");
    assertClean("playground");
  });

  test("a reward adapter's playground gives P(A preferred) as the API does", { timeout: 300_000 }, async () => {
    const job = await waitJob(state.rewardJob);
    assert.equal(job.status, "succeeded", JSON.stringify(job.error));
    await go("#/adapters/dash-reward");
    await page.locator("#compare-button").waitFor();
    const body = { prompt: "the transporter", response_a: "Bring on the sequel.", response_b: "One long, numbing action sequence." };
    await page.fill("#reward-prompt", body.prompt);
    await page.fill("#response-a", body.response_a);
    await page.fill("#response-b", body.response_b);
    await page.click("#compare-button");
    await page.locator("#comparison .comparison").waitFor();
    const shown = Number(await page.getAttribute("#comparison .comparison", "data-p"));
    const api = await apiCall("/reward/compare?adapter=dash-reward", { method: "POST", json: body });
    assert.ok(Math.abs(shown - api.p_a_preferred) < 1e-5, `${shown} vs ${api.p_a_preferred}`);
    assert.equal(await page.textContent("#preferred"), api.preferred.toUpperCase());
    await shot("11-reward-playground");
    assertClean("reward playground");
  });

  test("compare puts the methods trained on one dataset side by side", { timeout: 300_000 }, async () => {
    const fx = await waitJob(state.fxJob);
    assert.equal(fx.status, "succeeded", JSON.stringify(fx.error));
    await go(`#/compare/${state.dataset}`);
    await page.locator("#compare-table").waitFor();
    const rows = await page.$$eval("#compare-table tbody tr", (trs) => trs.map((t) => t.dataset.job));
    assert.deepEqual(rows.sort(), [state.jobId, state.fxJob].sort());
    assert.equal(await page.getAttribute("#chart-params", "data-points"), "2");
    assert.equal(await page.getAttribute("#chart-time", "data-points"), "2");
    const text = await page.textContent("#compare-table");
    const lora = await apiCall("/v1/adapters/dash-lora");
    const fxa = await apiCall("/v1/adapters/dash-fx");
    for (const a of [lora, fxa]) assert.ok(text.includes(a.trainable_params.toLocaleString("en-US")));
    assert.match(text, /Feature extraction/);
    assert.equal(await page.inputValue("#compare-dataset"), state.dataset);
    await shot("12-compare");
    assertClean("compare");
  });

  test("a job started from an uploaded dataset can be cancelled", { timeout: 300_000 }, async () => {
    await go("#/new");
    await page.locator("#dataset-select").waitFor();
    await page.selectOption("#dataset-select", state.dataset);
    await page.check("#method-adapter");
    await page.fill("#hp-max_steps", "5000");
    await page.fill("#hp-batch_size", "8");
    await page.fill("#adapter-name", "dash-cancel");
    await page.click("#start-button");
    await page.waitForURL(/#\/jobs\/ftjob-/);
    const jobId = decodeURIComponent(page.url().split("#/jobs/")[1]);
    // Let it start, so the stop goes through the worker (cancel_requested -> cancelled).
    await page.waitForFunction(() => document.querySelector(".page-head .status")?.dataset.status === "running",
      null, { timeout: 120_000 });
    await page.click("#cancel-job");
    await page.locator("#cancel-job.confirm").waitFor();
    await page.click("#cancel-job");
    await page.waitForFunction(() => document.querySelector(".page-head .status")?.dataset.status === "cancelled",
      null, { timeout: 120_000 });
    await page.waitForFunction(() => document.querySelector("#live")?.dataset.final === "cancelled");
    assert.equal((await apiCall(`/v1/fine_tuning/jobs/${jobId}`)).status, "cancelled");
    assert.match(await page.textContent("#event-log"), /Cancellation requested/);
    await shot("13-job-cancelled");
    assertClean("cancel");
  });

  test("a malformed %-escape in the address shows the not-found page", async () => {
    // decodeURIComponent throws on these; the page went blank with an uncaught URIError.
    for (const hash of ["#/jobs/%E0%A4%A", "#/adapters/%ZZ", "#/compare/%"]) {
      await go("#/adapters");
      await page.locator("#adapters-table").waitFor();
      await go(hash);
      await page.waitForFunction(() => document.querySelector("#view h1")?.textContent === "Not found");
      assert.match(await page.textContent("#view"), /No such page/);
      assertClean(hash);
    }
  });

  test("the job form refuses a number that overflows to Infinity, sending nothing", async () => {
    // JSON has no Infinity: 1e400 was sent as null and the job trained at the default.
    await go("#/new");
    await page.locator("#dataset-select").waitFor();
    await page.selectOption("#dataset-select", state.dataset);
    const jobsBefore = (await apiCall("/v1/fine_tuning/jobs")).data.length;
    const posts = [];
    const onRequest = (req) => {
      if (req.method() === "POST" && req.url().includes("/v1/fine_tuning/jobs")) posts.push(req.postData());
    };
    page.on("request", onRequest);
    // The text box (JSON or "auto"), and a number box, which the browser leaves "" (badInput).
    await page.fill("#hp-learning_rate", "1e400");
    await page.click("#start-button");
    await page.getByText("method.hyperparameters.learning_rate: must be a finite number").waitFor();
    await page.fill("#hp-learning_rate", "");
    await page.click("#hp-more summary");
    await page.fill("#hp-max_grad_norm", "1e400");
    await page.click("#start-button");
    await page.getByText("method.hyperparameters.max_grad_norm: must be a finite number").waitFor();
    await page.fill("#hp-max_grad_norm", "");
    await page.fill("#seed", "1e400");  // a random seed was used instead, without a word
    await page.click("#start-button");
    await page.getByText("seed: must be a whole number").waitFor();
    await page.fill("#seed", "");
    page.off("request", onRequest);
    assert.deepEqual(posts, []);
    assert.ok(!(await page.isDisabled("#start-button")), "the form can be corrected and sent");
    assert.match(page.url(), /#\/new$/);
    assert.equal((await apiCall("/v1/fine_tuning/jobs")).data.length, jobsBefore);
    await shot("14-new-job-not-finite");
    assertClean("non-finite number");
  });

  test("signing out forgets the key", async () => {
    await page.click("#sign-out");
    await page.waitForURL(/#\/login$/);
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    await go("#/adapters");
    await page.waitForURL(/#\/login$/);
    assertClean("sign out");
  });
});
