import { api, el, post, start, timeCell, showError } from "/ui/assets/common.js";

const status = document.getElementById("status");
let me;

async function refresh() {
  try {
    const [devices, tokens] = await Promise.all([api("/api/v1/devices"), api("/api/v1/tokens")]);
    document.querySelector("#devices tbody").replaceChildren(...devices.items.map((d) => el("tr", {},
      el("td", {}, d.tenant), el("td", {}, d.name), el("td", {}, d.user), el("td", { class: "mono" }, d.address),
      el("td", {}, d.groups.join(", ")), el("td", {}, d.origin),
      el("td", {}, d.state, d.state === "pending" && me.role === "admin"
        ? [" ", el("button", { onclick: () => act(() => post("/api/v1/devices/approve", { tenant: d.tenant, name: d.name })) }, "Approve")]
        : []))));
    document.querySelector("#tokens tbody").replaceChildren(...tokens.items.map((t) => el("tr", {},
      el("td", { class: "mono" }, t.id), el("td", {}, t.tenant), el("td", {}, t.user ?? "—"),
      el("td", {}, `${t.used} / ${t.max_uses ?? "∞"}`), el("td", {}, timeCell(t.expires_at * 1000)),
      el("td", {}, t.state), el("td", {}, t.created_by),
      el("td", {}, t.state === "valid" && me.role === "admin"
        ? el("button", { onclick: () => act(() => post(`/api/v1/tokens/${t.id}/revoke`)) }, "Revoke") : ""))));
  } catch (e) {
    showError(status, e);
  }
}

async function act(f) {
  try {
    await f();
    status.replaceChildren();
  } catch (e) {
    showError(status, e);
  }
  await refresh();
}

async function load() {
  me = await start("Devices");
  const form = document.getElementById("newtoken");
  if (me.role === "admin") form.classList.remove("hidden");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const r = await post("/api/v1/tokens", {
        tenant: form.tenant.value,
        user: form.user.value || null,
        groups: form.groups.value.split(",").map((g) => g.trim()).filter(Boolean),
        max_uses: Number(form.uses.value) || 1,
        pending: form.pending.checked,
      });
      const box = document.getElementById("created");
      box.classList.remove("hidden");
      // Shown once: the gateway keeps only a hash of the secret.
      box.replaceChildren(
        el("p", {}, "New token (shown once; copy it now):"),
        el("p", { class: "mono", id: "newtokentext" }, r.token),
        r.url ? el("p", { class: "mono" }, r.url) : el("p", { class: "muted" }, "Set gateway.enroll_listen for an enrollment URL and QR code."),
        r.qr_svg ? el("img", { class: "qr", alt: "QR code of the enrollment URL", src: "data:image/svg+xml;base64," + btoa(r.qr_svg) }) : null);
      status.replaceChildren();
    } catch (e) {
      showError(status, e);
    }
    await refresh();
  });
  await refresh();
}

load();
