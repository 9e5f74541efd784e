import { api, el, start, timeCell, showError, filterForm, nextLink, fleetView, nodeColumn } from "/ui/assets/common.js";

const FILTERS = ["tenant", "user", "device", "host", "decision", "flow", "from", "to", "fleet", "node"];
const FLEET_FILTERS = ["node", "tenant", "user", "device", "host", "decision", "flow", "from"];
const form = document.getElementById("filters");
const status = document.getElementById("status");
const { params, api: query } = filterForm(form, FILTERS, "/ui/http");

async function load() {
  await start("HTTP requests");
  const fleet = fleetView(form, query, FLEET_FILTERS);
  if (fleet) nodeColumn("requests");
  let page;
  try {
    page = await api("/api/v1/http?" + query);
  } catch (e) {
    showError(status, e);
    return;
  }
  document.querySelector("#requests tbody").replaceChildren(...page.items.map((r) => {
    // A fleet record's flow id is its node's own: the flows of all nodes are not looked up by id.
    const flow = fleet && r.flow_id !== null && r.flow_id !== undefined
      ? el("span", { class: "flow-link", title: `flow ${r.flow_id} of node ${r.node}` }, "flow " + r.flow_id)
      : r.flow_id !== null && r.flow_id !== undefined
      ? el("a", { href: "/ui/flows?id=" + r.flow_id, class: "flow-link" }, "flow " + r.flow_id)
      : el("span", { class: "muted", title: "the flow's record was lost or belongs to an earlier store" }, `seq ${r.flow_seq}`);
    return el("tr", { dataset: fleet ? { request: r.id, device: r.device, node: r.node } : { request: r.id, device: r.device } },
      fleet ? el("td", { class: "node" }, r.node) : null,
      el("td", {}, timeCell(r.at_ms)), el("td", {}, r.tenant), el("td", {}, r.user), el("td", {}, r.device),
      el("td", {}, r.method), el("td", { class: "mono" }, r.host, r.sni && r.sni !== r.host ? ` (SNI ${r.sni})` : ""),
      el("td", { class: "mono" }, r.path),
      el("td", {}, r.status ?? "—"), el("td", {}, `${r.req_bytes} / ${r.resp_bytes}`), el("td", {}, `${r.duration_ms} ms`),
      el("td", {}, el("span", { class: "badge " + r.decision }, r.decision), r.error ? [el("br"), el("span", { class: "error" }, r.error)] : null),
      el("td", {}, r.rule ?? r.flow_rule), el("td", { class: "mono" }, r.ref_id || "—"), el("td", {}, flow));
  }));
  status.replaceChildren(el("p", { class: "muted" }, `${page.items.length} request(s)${fleet ? " of all nodes" : ""}${page.next_cursor ? ", older ones on the next page" : ""}`));
  nextLink(document.getElementById("next"), "/ui/http", params, page.next_cursor);
  document.body.dataset.ready = "1";
}

load();
