// The loraplex API from the browser. The key lives in sessionStorage (gone when the tab
// closes) and only ever travels in the Authorization header, never in a URL.

const KEY_NAME = "loraplex.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, message, code, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

// Called on a 401 (the app sends the user back to sign in).
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

async function errorFrom(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let code = null;
  let param = null;
  try {
    const body = await resp.json();
    const err = body.error || {};
    if (err.message) message = err.message;
    code = err.code || null;
    param = err.param || null;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, message, code, param);
}

function headers(extra) {
  const out = { ...extra };
  const key = getKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

/**
 * api("/v1/adapters") -> parsed JSON. Options: method, json (a body to send as JSON),
 * form (a FormData), signal, key (use this key instead of the stored one).
 */
export async function api(path, { method = "GET", json, form, signal, key } = {}) {
  const init = { method, signal, headers: headers(), cache: "no-store" };
  if (key) init.headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form !== undefined) {
    init.body = form;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    const err = await errorFrom(resp);
    if (resp.status === 401 && !key) onUnauthorized(err);
    throw err;
  }
  return resp.json();
}

/** Every page of a list endpoint (at most maxPages of 100). */
export async function listAll(path, { signal, maxPages = 10 } = {}) {
  const out = [];
  let after = null;
  for (let page = 0; page < maxPages; page += 1) {
    const sep = path.includes("?") ? "&" : "?";
    const url = `${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`;
    const body = await api(url, { signal });
    out.push(...body.data);
    if (!body.has_more || !body.last_id) break;
    after = body.last_id;
  }
  return out;
}

/**
 * Follow /v1/fine_tuning/jobs/{id}/events/stream (server-sent events) with fetch(), which,
 * unlike EventSource, can send the Authorization header. Reconnects with Last-Event-ID
 * after a dropped connection; after `maxFailures` failures in a row it hands over to
 * polling. Returns a function that stops it.
 *
 * handlers: onJob(job), onEvent(event), onDone(status), onMode("stream" | "polling").
 */
export function followJob(jobId, handlers) {
  const controller = new AbortController();
  const { signal } = controller;
  let lastEventId = null;
  let failures = 0;
  const maxFailures = 3;
  let retryMs = 2000;

  const sleep = (ms) =>
    new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => {
        clearTimeout(t);
        resolve();
      });
    });

  function dispatch(type, data, id) {
    if (id) lastEventId = id;
    const value = JSON.parse(data);
    if (type === "job") handlers.onJob?.(value);
    else if (type === "event") handlers.onEvent?.(value);
    else if (type === "done") handlers.onDone?.(value.status);
  }

  async function streamOnce() {
    const h = headers({ Accept: "text/event-stream" });
    if (lastEventId) h["Last-Event-ID"] = lastEventId;
    const resp = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events/stream`, {
      headers: h,
      signal,
      cache: "no-store",
    });
    if (!resp.ok) {
      const err = await errorFrom(resp);
      if (resp.status === 401) onUnauthorized(err);
      throw err;
    }
    handlers.onMode?.("stream");
    failures = 0;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let type = "message";
    let data = [];
    let id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false; // closed without "done": reconnect
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") {
          if (data.length) {
            dispatch(type, data.join("\n"), id);
            if (type === "done") {
              await reader.cancel().catch(() => {});
              return true;
            }
          }
          type = "message";
          data = [];
          id = null;
        } else if (line.startsWith(":")) {
          // comment (keep-alive)
        } else {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") type = val;
          else if (field === "data") data.push(val);
          else if (field === "id") id = val;
          else if (field === "retry" && /^\d+$/.test(val)) retryMs = Number(val);
        }
      }
    }
  }

  async function poll() {
    handlers.onMode?.("polling");
    const seen = new Set();
    while (!signal.aborted) {
      try {
        const job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`, { signal });
        const page = await api(
          `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?order=asc&limit=100` +
            (lastEventId ? `&after=${encodeURIComponent(lastEventId)}` : ""),
          { signal },
        );
        handlers.onJob?.(job);
        for (const ev of page.data) {
          if (seen.has(ev.id)) continue;
          seen.add(ev.id);
          lastEventId = ev.id;
          handlers.onEvent?.(ev);
        }
        if (!page.has_more && ["succeeded", "failed", "cancelled"].includes(job.status)) {
          handlers.onDone?.(job.status);
          return;
        }
        if (page.has_more) continue;
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && (err.status === 401 || err.status === 404)) {
          handlers.onError?.(err);
          return;
        }
      }
      await sleep(2000);
    }
  }

  (async () => {
    while (!signal.aborted) {
      try {
        if (await streamOnce()) return;
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError && (err.status === 401 || err.status === 404)) {
          handlers.onError?.(err);
          return;
        }
        failures += 1;
        if (failures >= maxFailures) {
          await poll();
          return;
        }
      }
      await sleep(retryMs);
    }
  })();

  return () => controller.abort();
}
