import { api, el, start, timeCell, duration, showError, filterForm, nextLink, fleetView, nodeColumn } from "/ui/assets/common.js";

// `id` has no input: it comes from a link on the HTTP page ("its flow").
const FILTERS = ["tenant", "user", "device", "dst", "action", "from", "to", "id", "fleet", "node"];
const FLEET_FILTERS = ["node", "tenant", "user", "device", "from"];
const form = document.getElementById("filters");
const status = document.getElementById("status");
const { params, api: query } = filterForm(form, FILTERS, "/ui/flows");

const PROTOCOLS = { 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6" };

function endpoint(ip, port, protocol) {
  const host = ip.includes(":") ? `[${ip}]` : ip;
  return protocol === 6 || protocol === 17 ? `${host}:${port}` : ip;
}

function links(f) {
  const out = [];
  if (f.http_requests > 0) {
    out.push(el("a", { href: "/ui/http?flow=" + f.id, class: "http-link" }, `${f.http_requests} HTTP request(s)`));
  }
  if (f.ssh_session) {
    if (out.length) out.push(el("br"));
    out.push(el("a", { href: "/ui/session?id=" + encodeURIComponent(f.ssh_session), class: "ssh-link" }, "SSH session"));
  }
  return out;
}

async function load() {
  await start("Flows");
  const fleet = fleetView(form, query, FLEET_FILTERS);
  if (fleet) nodeColumn("flows");
  let page;
  try {
    page = await api("/api/v1/flows?" + query);
  } catch (e) {
    showError(status, e);
    return;
  }
  document.querySelector("#flows tbody").replaceChildren(...page.items.map((f) => {
    const end = f.ended_ms !== null && f.ended_ms !== undefined
      ? [timeCell(f.ended_ms), el("br"), `${f.end_reason ?? "ended"} after ${duration(f.ended_ms - f.started_ms)}`]
      : [el("span", { class: "badge" }, "open")];
    // A fleet flow's id is its node's own row id: unique only with the node.
    return el("tr", { dataset: fleet ? { flow: f.id, device: f.device, node: f.node } : { flow: f.id, device: f.device } },
      fleet ? el("td", { class: "node" }, f.node) : null,
      el("td", {}, timeCell(f.started_ms)), el("td", {}, f.tenant), el("td", {}, f.user), el("td", {}, f.device),
      el("td", {}, PROTOCOLS[f.protocol] ?? String(f.protocol)),
      el("td", { class: "mono" }, endpoint(f.src, f.sport, f.protocol)),
      el("td", { class: "mono" }, endpoint(f.dst, f.dport, f.protocol), f.dst_device ? ` (${f.dst_device})` : ""),
      el("td", {}, el("span", { class: "badge " + f.action }, f.action)), el("td", {}, f.rule),
      el("td", {}, `${f.packets_out} / ${f.bytes_out}`), el("td", {}, `${f.packets_in} / ${f.bytes_in}`),
      el("td", {}, end), el("td", {}, links(f)));
  }));
  status.replaceChildren(el("p", { class: "muted" }, `${page.items.length} flow(s)${fleet ? " of all nodes" : ""}${page.next_cursor ? ", older ones on the next page" : ""}`));
  nextLink(document.getElementById("next"), "/ui/flows", params, page.next_cursor);
  document.body.dataset.ready = "1";
}

load();
