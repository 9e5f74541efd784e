import { api, el, start, timeCell, duration, showError } from "/ui/assets/common.js";

const FILTERS = ["tenant", "user", "device", "target", "from", "to", "q", "live"];
const params = new URLSearchParams(location.search);
const form = document.getElementById("filters");
const status = document.getElementById("status");

for (const k of FILTERS) {
  const input = form.elements[k];
  if (input.type === "checkbox") input.checked = params.get(k) === "1";
  else input.value = params.get(k) ?? "";
}

// Filters live in the URL, so a filtered view can be bookmarked and shared.
form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = new URLSearchParams();
  for (const k of FILTERS) {
    const input = form.elements[k];
    if (input.type === "checkbox" ? input.checked : input.value !== "") q.set(k, input.type === "checkbox" ? "1" : input.value);
  }
  location.assign("/ui/sessions?" + q);
});

async function load() {
  await start("SSH sessions");
  const q = new URLSearchParams();
  for (const k of [...FILTERS, "cursor"]) if (params.get(k)) q.set(k, params.get(k));
  let page;
  try {
    page = await api("/api/v1/sessions?" + q);
  } catch (e) {
    showError(status, e);
    return;
  }
  const body = document.querySelector("#sessions tbody");
  body.replaceChildren(...page.items.map((s) => {
    const link = el("a", { href: "/ui/session?id=" + encodeURIComponent(s.session_id) }, timeCell(s.started_ms));
    const badges = [el("span", { class: "badge " + s.status }, s.status)];
    if (s.status === "live") badges.push(" ", el("a", { href: "/ui/live?id=" + encodeURIComponent(s.session_id) }, "watch"));
    return el("tr", { dataset: { session: s.session_id } },
      el("td", {}, link), el("td", {}, s.tenant), el("td", {}, s.user), el("td", {}, s.device),
      el("td", { class: "mono" }, s.target), el("td", {}, s.login),
      el("td", {}, s.ended_ms ? duration(s.ended_ms - s.started_ms) : ""),
      el("td", {}, s.channels), el("td", {}, badges));
  }));
  const notes = [`${page.items.length} session(s)`];
  if (page.sealed_commands_not_searched > 0) {
    notes.push(`${page.sealed_commands_not_searched} sealed command(s) were not searched: the gateway cannot read them (open a sealed session with the reviewer key to search its commands)`);
  }
  status.replaceChildren(el("p", { class: "muted" }, notes.join("; ")));
  if (page.next_cursor) {
    const next = new URLSearchParams(params);
    next.set("cursor", page.next_cursor);
    const a = document.getElementById("next");
    a.href = "/ui/sessions?" + next;
    a.classList.remove("hidden");
  }
}

load();
