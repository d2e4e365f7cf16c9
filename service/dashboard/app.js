// The loraplex dashboard: hash-routed views over the public API. This module is the router;
// each view lives in its own module and draws into ctx.view (the page's <main>).
//   #/login  #/jobs  #/jobs/<id>  #/new  #/adapters  #/adapters/<name>  #/compare[/<dataset>]

import { adapterView, adaptersView } from "./adapters.js";
import { getKey, setUnauthorizedHandler } from "./api.js";
import { compareView } from "./compare.js";
import { clear, h } from "./dom.js";
import { jobView, jobsView } from "./jobs.js";
import { loginView, signOut } from "./login.js";
import { newJobView } from "./new-job.js";
import { errorBox, pageHead } from "./widgets.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");

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

// Each render aborts the previous view's requests and runs its cleanups (timers, streams,
// window listeners) before the next view draws.
async function render() {
  if (current) {
    current.controller.abort();
    for (const fn of current.cleanups) fn();
  }
  const ctx = { view, controller: new AbortController(), cleanups: [] };
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
    let args;
    try {
      args = m.slice(1).map((x) => (x === undefined ? undefined : decodeURIComponent(x)));
    } catch {
      // A malformed %-escape (#/jobs/%E0%A4%A) names nothing: the not-found page, not a
      // URIError that leaves <main> blank.
      break;
    }
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

setUnauthorizedHandler((err) => signOut(`Signed out: ${err.message}`));
document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));

window.addEventListener("hashchange", render);
render();
