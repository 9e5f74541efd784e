// Shared helpers of the review pages. Everything that came from a device (users, commands, paths, output) is
// put into the page as text (textContent), never as HTML.

export let me = null;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(path, opts = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...opts });
  if (r.status === 401) {
    const next = location.pathname + location.search;
    location.assign("/ui/login?next=" + encodeURIComponent(next));
    throw new ApiError(401, "unauthenticated", "signed out");
  }
  const ct = r.headers.get("content-type") || "";
  if (!r.ok) {
    let code = "http_" + r.status, message = r.statusText;
    if (ct.startsWith("application/json")) {
      const e = await r.json();
      code = e.error;
      message = e.message;
    }
    throw new ApiError(r.status, code, message);
  }
  return ct.startsWith("application/json") ? r.json() : r;
}

export async function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-rampart-csrf": me?.csrf ?? "" },
    body: JSON.stringify(body ?? {}),
  });
}

/// el("td", {class: "mono"}, "text", child, ...): children are text (never parsed as HTML) or nodes.
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

/// Absolute local time with its zone; UTC in the tooltip.
export function timeCell(ms) {
  if (ms === null || ms === undefined) return el("span", { class: "muted" }, "—");
  const d = new Date(ms);
  const off = -d.getTimezoneOffset();
  const zone = "UTC" + (off >= 0 ? "+" : "-") + pad(Math.floor(Math.abs(off) / 60)) + ":" + pad(Math.abs(off) % 60);
  const local = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} ${zone}`;
  return el("time", { datetime: d.toISOString(), title: d.toISOString() }, local);
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "";
  const s = ms / 1000;
  return s < 60 ? s.toFixed(1) + " s" : Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

export function showError(where, e) {
  where.replaceChildren(el("p", { class: "error", role: "alert" }, e?.message ?? String(e)));
}

/// Signs the page in (or sends it to the login page) and draws the header.
export async function start(title) {
  me = await api("/api/v1/me");
  const links = [["/ui/sessions", "SSH sessions"], ["/ui/flows", "Flows"], ["/ui/http", "HTTP requests"], ["/ui/devices", "Devices & tokens"]];
  const header = el("header", { class: "top" },
    el("strong", {}, "Rampart review"),
    ...links.map(([href, text]) => el("a", { href }, text)),
    el("span", { class: "who" }, `${me.name} (${me.role})`),
    el("button", { id: "logout", onclick: async () => { await post("/api/v1/logout"); location.assign("/ui/login"); } }, "Sign out"));
  document.body.prepend(header);
  document.title = title + " · Rampart";
  return me;
}

/// A list page's filter form: fills it from the URL, and on submit goes to `page` with the filters in the URL
/// (so a filtered view can be bookmarked and shared). Returns the API query for the filters and the cursor.
export function filterForm(form, names, page) {
  const params = new URLSearchParams(location.search);
  for (const k of names) {
    const input = form.elements[k];
    if (!input) continue;
    if (input.type === "checkbox") input.checked = params.get(k) === "1";
    else input.value = params.get(k) ?? "";
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const k of names) {
      const input = form.elements[k];
      if (!input) {
        // A filter without an input (a link's `flow=`) stays as it came.
        if (params.get(k)) q.set(k, params.get(k));
      } else if (input.type === "checkbox" ? input.checked : input.value !== "") {
        q.set(k, input.type === "checkbox" ? "1" : input.value);
      }
    }
    location.assign(page + "?" + q);
  });
  const api = new URLSearchParams();
  for (const k of [...names, "cursor"]) if (params.get(k)) api.set(k, params.get(k));
  return { params, api };
}

/// Shows the "older" link of a list page when the API gave a next cursor.
export function nextLink(a, page, params, cursor) {
  if (!cursor) return;
  const next = new URLSearchParams(params);
  next.set("cursor", cursor);
  a.href = page + "?" + next;
  a.classList.remove("hidden");
}

/// "All nodes" on a list page. With `[fleet]` (`me.fleet_node`) the form's `.fleet` box (the `fleet` switch
/// and the `node` filter, both kept in the URL) is shown; with the switch on, the page lists what every node
/// shipped (`fleet=1`), which takes only the filters in `allowed`: the others are greyed out (kept in the URL
/// for when the switch goes off). Without `[fleet]` the page is as it always was. Returns whether the list is
/// the fleet's; `query` (the API query from `filterForm`) is narrowed to match.
export function fleetView(form, query, allowed) {
  const box = form.querySelector(".fleet");
  const on = !!me?.fleet_node && query.get("fleet") === "1";
  if (me?.fleet_node) {
    box.classList.remove("hidden");
    box.title = `this gateway is node ${me.fleet_node} of a fleet`;
    form.elements.fleet.addEventListener("change", () => form.requestSubmit());
  }
  if (!on) {
    query.delete("fleet");
    query.delete("node");
    if (form.elements.node) form.elements.node.disabled = true;
    return false;
  }
  for (const input of form.elements) {
    if (input.name && input.name !== "fleet" && !allowed.includes(input.name)) {
      input.disabled = true;
      input.title = "not available with All nodes";
    }
  }
  for (const k of [...query.keys()]) if (!allowed.includes(k)) query.delete(k);
  query.set("fleet", "1");
  return true;
}

/// The Node column of a list page that shows the fleet.
export function nodeColumn(table) {
  document.querySelector(`#${table} thead tr`).prepend(el("th", {}, "Node"));
}
