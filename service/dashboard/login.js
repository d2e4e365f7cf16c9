// #/login: sign in with a tenant's API key. signOut() forgets the key and comes back here
// with a notice saying why.

import { api, clearKey, setKey } from "./api.js";
import { clear, h } from "./dom.js";

let loginNotice = null;

export function signOut(notice) {
  clearKey();
  loginNotice = notice;
  location.hash = "#/login";
}

export function loginView(ctx) {
  const { view } = ctx;
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
