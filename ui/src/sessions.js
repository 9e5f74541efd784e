import { api, el, start, timeCell, duration, showError, filterForm, nextLink, fleetView, nodeColumn, me } from "/ui/assets/common.js";

const FILTERS = ["tenant", "user", "device", "target", "from", "to", "q", "live", "fleet", "node"];
const FLEET_FILTERS = ["node", "tenant", "user", "device", "target", "from"];
const form = document.getElementById("filters");
const status = document.getElementById("status");
const { params, api: query } = filterForm(form, FILTERS, "/ui/sessions");

/// A session of the fleet has no live state here: ended when its end record was shipped, open until then.
function sessionStatus(s, fleet) {
  if (!fleet) return s.status;
  if (s.decision && s.decision !== "allowed") return "refused";
  return s.ended_ms ? "ended" : "open";
}

async function load() {
  await start("SSH sessions");
  const fleet = fleetView(form, query, FLEET_FILTERS);
  if (fleet) nodeColumn("sessions");
  let page;
  try {
    page = await api("/api/v1/sessions?" + query);
  } catch (e) {
    showError(status, e);
    return;
  }
  const body = document.querySelector("#sessions tbody");
  body.replaceChildren(...page.items.map((s) => {
    // Another node's session is read from the fleet (its records in PostgreSQL, its recording in the bucket).
    const other = fleet && s.node !== me.fleet_node;
    const href = "/ui/session?id=" + encodeURIComponent(s.session_id) + (other ? "&fleet=1" : "");
    const link = el("a", { href }, timeCell(s.started_ms));
    const st = sessionStatus(s, fleet);
    const badges = [el("span", { class: "badge " + st }, st)];
    if (st === "live") badges.push(" ", el("a", { href: "/ui/live?id=" + encodeURIComponent(s.session_id) }, "watch"));
    return el("tr", { dataset: fleet ? { session: s.session_id, node: s.node } : { session: s.session_id } },
      fleet ? el("td", { class: "node" }, s.node) : null,
      el("td", {}, link), el("td", {}, s.tenant), el("td", {}, s.user), el("td", {}, s.device),
      el("td", { class: "mono" }, s.target), el("td", {}, s.login),
      el("td", {}, s.ended_ms ? duration(s.ended_ms - s.started_ms) : ""),
      el("td", {}, s.channels), el("td", {}, badges));
  }));
  const notes = [`${page.items.length} session(s)${fleet ? " of all nodes" : ""}`];
  if (page.sealed_commands_not_searched > 0) {
    notes.push(`${page.sealed_commands_not_searched} sealed command(s) were not searched: the gateway cannot read them (open a sealed session with the reviewer key to search its commands)`);
  }
  status.replaceChildren(el("p", { class: "muted" }, notes.join("; ")));
  nextLink(document.getElementById("next"), "/ui/sessions", params, page.next_cursor);
  document.body.dataset.ready = "1";
}

load();
