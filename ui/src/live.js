import { el, post, start, showError } from "/ui/assets/common.js";
import { Terminal } from "/ui/vendor/xterm/xterm.mjs";

// xterm.js writes its theme and cell sizes into <style> elements it creates, which the CSP refuses (no inline
// style). On this page those elements are stand-ins whose text goes into a constructed stylesheet instead
// (CSSOM, which the CSP does not govern): the same rules apply, nothing inline is inserted.
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (tag, options) {
  if (String(tag).toLowerCase() !== "style") return createElement.call(this, tag, options);
  const doc = this;
  const sheet = new CSSStyleSheet();
  doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
  const standIn = createElement.call(doc, "template");
  let text = "";
  Object.defineProperty(standIn, "textContent", {
    get: () => text,
    set: (v) => { text = String(v); sheet.replaceSync(text); },
  });
  standIn.remove = () => {
    doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((s) => s !== sheet);
    Element.prototype.remove.call(standIn);
  };
  return standIn;
};

const id = new URLSearchParams(location.search).get("id") ?? "";
const status = document.getElementById("status");
// The stream's state and the result of a terminate request are shown apart: the stream may end before the
// request's answer arrives.
const action = document.getElementById("action");

async function load() {
  const me = await start("Live session");
  document.getElementById("review").href = "/ui/session?id=" + encodeURIComponent(id);
  const term = new Terminal({ disableStdin: true, convertEol: false, cols: 120, rows: 32, scrollback: 5000 });
  term.open(document.getElementById("term"));
  window.rampart = { term };
  const events = new EventSource(`/api/v1/sessions/${encodeURIComponent(id)}/live`);
  events.onmessage = (ev) => {
    const bytes = Uint8Array.from(atob(ev.data), (c) => c.charCodeAt(0));
    term.write(bytes);
    status.replaceChildren(el("p", { class: "ok", id: "streaming" }, "streaming"));
  };
  events.addEventListener("end", () => {
    events.close();
    status.replaceChildren(el("p", { class: "muted", id: "ended" }, "The session has ended."));
  });
  events.addEventListener("lagged", (ev) => term.write(`\r\n[rampart: ${ev.data} chunks skipped: this viewer fell behind]\r\n`));
  let received = false;
  events.addEventListener("message", () => { received = true; });
  events.onerror = () => {
    if (status.querySelector("#ended")) return;
    events.close();
    status.replaceChildren(el("p", { class: "muted", id: "ended" }, received
      ? "The stream ended (the session is over, or the connection to the gateway dropped)."
      : "No live stream: the session is not running, not yours to see, or sealed to the tenant's reviewer key."));
  };
  if (me.role === "admin") {
    const b = document.getElementById("terminate");
    b.classList.remove("hidden");
    b.addEventListener("click", async () => {
      if (!confirm("Terminate this SSH session? The user is disconnected, and this is recorded.")) return;
      try {
        await post(`/api/v1/sessions/${encodeURIComponent(id)}/terminate`);
        action.replaceChildren(el("p", { class: "ok", id: "terminated" }, "Termination requested."));
      } catch (e) {
        showError(action, e);
      }
    });
  }
}

load();
