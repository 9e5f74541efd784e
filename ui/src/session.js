import { api, el, start, timeCell, duration, showError } from "/ui/assets/common.js";
import { importReviewerKey, decodeCapture, toAsciicast, openSealed, sha256Hex } from "/ui/assets/capture.js";

const id = new URLSearchParams(location.search).get("id") ?? "";
// A session of another node (`fleet=1`, from the sessions page with "All nodes"): its records come from the
// fleet's PostgreSQL and its recordings from the fleet's object store, verified by the gateway first.
const fleet = new URLSearchParams(location.search).get("fleet") === "1";
const fleetQuery = fleet ? "?fleet=1" : "";
const status = document.getElementById("status");
let session = null;
let reviewerKey = null;
/// Per channel: { player, commands, highlight }.
const views = new Map();
// Tests and curious reviewers reach the players here; nothing else is global.
window.rampart = { views };

function text(secret) {
  if (typeof secret === "string") return secret;
  return "🔒 sealed (load the reviewer key)";
}

function meta(label, value) {
  return [el("dt", {}, label), el("dd", {}, value)];
}

function drawMeta(s) {
  const start = s.start ?? {};
  const chain = s.chain;
  const chainText = chain.signed
    ? `all ${chain.records} records chained and covered by a signed checkpoint`
    : `${chain.chained} of ${chain.records} records chained; ${chain.last_checkpoint_ms ? "newest records not yet signed" : "no checkpoint covers them yet"}`;
  document.getElementById("meta").replaceChildren(
    ...meta("Session", s.id),
    ...(s.node ? meta("Node", el("span", { id: "node" }, `${s.node} (read from the fleet: its records as shipped to PostgreSQL, its recordings from the object store)`)) : []),
    ...meta("Correlation", `device ${s.device} (WireGuard peer of ${s.user}, tenant ${s.tenant}) → flow from ${start.client_addr ?? "?"} to ${s.target} → SSH session ${s.id} as ${s.login || "?"} → ${s.channels.length} channel(s)`),
    ...meta("Started", timeCell(s.started_ms)),
    ...meta("Ended", s.ended_ms ? [timeCell(s.ended_ms), ` (${s.end_reason}${s.end_error ? ": " + s.end_error : ""}, after ${duration(s.ended_ms - s.started_ms)})`] : s.status),
    ...meta("Rule", s.rule),
    ...meta("Authentication", `${start.auth_method ?? "?"}${start.client_key_fp ? " key " + start.client_key_fp : ""}; target key ${start.target_host_key_fp ?? "?"} (${start.target_host_key_trust ?? "?"})`),
    ...meta("Recording", `${start.recording ?? "?"}${start.capture_input ? ", typed lines captured" : ""}${s.sealed ? ", sealed to the tenant's reviewer key" : ""}`),
    ...meta("Hash chain", el("span", { class: chain.signed ? "ok" : "muted", id: "chain" }, s.node ? `${chain.chained} of ${chain.records} records chained in node ${s.node}'s chain (checked by rampart audit verify --fleet)` : chainText)),
    // The verify button checks this node's own store, which does not hold another node's session.
    ...(s.node ? [] : meta("Verification", [
      el("span", { class: "muted", id: "verify" }, "not checked in this view "),
      el("button", { type: "button", id: "verify-run", onclick: () => drawVerify(s) }, "Verify the audit chain"),
    ])),
  );
  if (s.status === "live" && !s.node) {
    document.getElementById("meta").append(...meta("Live", el("a", { href: "/ui/live?id=" + encodeURIComponent(s.id) }, "watch this session live")));
  }
}

/// The whole store's chain verified now (what `rampart audit verify` checks), told for this session's records:
/// a break at or before its last record means they cannot be trusted. On request only: it reads every record and
/// recording of the store.
async function drawVerify(s) {
  const out = document.getElementById("verify");
  const button = document.getElementById("verify-run");
  button.disabled = true;
  out.className = "muted";
  delete out.dataset.status;
  out.textContent = "verifying the audit chain… ";
  let v;
  try {
    v = await api("/api/v1/verify");
  } catch (e) {
    out.className = "error";
    out.textContent = "could not verify: " + e.message + " ";
    button.disabled = false;
    return;
  }
  button.disabled = false;
  const key = v.key ? ` with ${v.key.pinned ? "the pinned key" : "the gateway's own key (set audit.verify_key to pin one)"} ${v.key.fingerprint}` : "";
  const when = timeCell(v.verified_at_ms);
  out.dataset.status = v.status;
  if (v.ok) {
    out.className = "ok";
    out.replaceChildren(`verified: records ${s.chain.first_seq}–${s.chain.last_seq} of this session are intact in the chain of ${v.records} records${key} (`, when, ")");
  } else if (v.first_break.seq <= s.chain.last_seq) {
    out.className = "error";
    out.dataset.status = "broken-here";
    out.replaceChildren(`BROKEN: the chain breaks at record ${v.first_break.seq}, at or before this session's records (${s.chain.first_seq}–${s.chain.last_seq}): ${v.first_break.what} (`, when, ")");
  } else {
    out.className = "ok";
    out.dataset.status = "broken-later";
    out.replaceChildren(`this session's records (${s.chain.first_seq}–${s.chain.last_seq}) verify; the chain breaks later, at record ${v.first_break.seq}: ${v.first_break.what} (`, when, ")");
  }
}

function fmtT(t) {
  const m = Math.floor(t / 60);
  return `${m}:${(t - m * 60).toFixed(1).padStart(4, "0")}`;
}

function drawChannel(ch) {
  const commands = session.commands.filter((c) => c.channel === ch.seq);
  const rec = ch.recording;
  const what = `${ch.program}${ch.subsystem ? " " + ch.subsystem : ""}${ch.command !== null && ch.command !== undefined ? " " + text(ch.command) : ""}`;
  const exit = ch.exit_status !== null && ch.exit_status !== undefined ? `exit ${ch.exit_status}` : ch.exit_signal ? `signal ${ch.exit_signal}` : "";
  const box = el("section", { class: "channel", dataset: { channel: ch.seq } },
    el("h2", {}, `Channel ${ch.seq}: `, el("span", { class: "mono cmdtext" }, what), exit ? ` — ${exit}` : ""),
    el("p", { class: "muted" }, `opened `, timeCell(ch.opened_ms), ch.pty ? `, terminal ${ch.pty.term} ${ch.pty.cols}×${ch.pty.rows}` : "", `, ${ch.bytes_in} bytes in, ${ch.bytes_out} bytes out`,
      rec ? `; recording ${rec.format}, ${rec.size} bytes${rec.complete ? "" : " (incomplete)"}${rec.intact === false ? " — DOES NOT MATCH ITS CHAINED HASH" : ""}` : "; not recorded"));
  const list = el("ul", {});
  commands.forEach((c, i) => {
    list.append(el("li", { dataset: { index: i, t: c.t }, title: new Date(c.at_ms).toISOString() },
      el("span", { class: "t" }, fmtT(c.t)),
      c.exit_status !== null && c.exit_status !== undefined ? el("span", { class: "exit" }, `exit ${c.exit_status}`) : null,
      el("span", { class: "mono cmdtext" }, text(c.text))));
  });
  const player = el("div", { class: "player" });
  const message = el("p", { class: "playermsg" });
  const layout = el("div", { class: "review" }, el("div", {}, player, message), el("div", { class: "timeline" }, el("h2", {}, "Commands"), list));
  box.append(layout);
  views.set(ch.seq, { box, player: null, commands, list, message, el: player, ch });
  return box;
}

async function mountPlayer(seq, data) {
  const v = views.get(seq);
  v.el.replaceChildren();
  const markers = v.commands.map((c) => [c.t, "command " + (v.commands.indexOf(c) + 1)]);
  v.player = AsciinemaPlayer.create({ data }, v.el, { fit: "width", markers, idleTimeLimit: undefined, preload: true });
  await new Promise((resolve) => {
    const tick = () => (typeof v.player.getDuration() === "number" ? resolve() : setTimeout(tick, 50));
    tick();
  });
  v.list.querySelectorAll("li").forEach((li) => {
    li.addEventListener("click", () => seekTo(seq, Number(li.dataset.index)));
  });
  // The command playing now is highlighted, 4 times a second.
  setInterval(() => {
    const t = v.player.getCurrentTime();
    let cur = -1;
    v.commands.forEach((c, i) => { if (c.t <= t + 0.05) cur = i; });
    v.list.querySelectorAll("li").forEach((li, i) => li.classList.toggle("current", i === cur));
    if (v.stopAt !== undefined && t >= v.stopAt) stop(v);
  }, 250);
}

/// Pauses exactly at the end of the command being played (the timer may fire late: the seek puts the
/// terminal back to that moment, so the next command's output never shows).
async function stop(v) {
  const at = v.stopAt;
  v.stopAt = undefined;
  v.player.pause();
  await v.player.seek(at);
  v.stopped = at;
}

/// Plays command `i` from its start to the next command's start, then pauses: the terminal shows its output.
async function seekTo(seq, i) {
  const v = views.get(seq);
  if (!v.player) return;
  const c = v.commands[i];
  const next = v.commands[i + 1];
  v.el.scrollIntoView({ block: "nearest" });
  v.stopAt = undefined;
  await v.player.seek(c.t);
  v.stopAt = next ? Math.max(c.t, next.t - 0.05) : undefined;
  v.stopped = undefined;
  v.seekedTo = c.t;
  v.player.play();
  if (v.stopAt !== undefined) {
    const stopAt = v.stopAt;
    setTimeout(() => { if (v.stopAt === stopAt) stop(v); }, Math.max(0, (stopAt - c.t) * 1000));
  }
}

/// A recording that cannot be played says why instead of showing an empty player.
function recordingError(v, e) {
  v.el.replaceChildren();
  v.el.classList.add("hidden");
  if (e?.code === "recording_unverified") {
    v.message.dataset.status = "unverified";
    v.message.replaceChildren(el("p", { class: "error", role: "alert" },
      "Not shown: the recording in the fleet's object store does not match its audit record (changed or damaged after it was uploaded). ",
      el("span", { class: "muted" }, e.message)));
  } else {
    showError(v.message, e);
  }
}

async function loadPlain(ch) {
  const v = views.get(ch.seq);
  try {
    const r = await api(`/api/v1/sessions/${encodeURIComponent(id)}/channels/${ch.seq}/cast${fleetQuery}`);
    await mountPlayer(ch.seq, await r.text());
  } catch (e) {
    recordingError(v, e);
  }
}

async function loadSealed(ch) {
  const v = views.get(ch.seq);
  try {
    const r = await api(`/api/v1/sessions/${encodeURIComponent(id)}/channels/${ch.seq}/blob${fleetQuery}`);
    const bytes = new Uint8Array(await r.arrayBuffer());
    // The chained close record names the capture's sha256: a changed file is refused before decryption.
    const got = await sha256Hex(bytes);
    if (ch.recording.sha256 && got !== ch.recording.sha256) {
      throw new Error(`the capture does not match its chained hash (sha256 ${got}, the audit chain says ${ch.recording.sha256}): not shown`);
    }
    const decoded = await decodeCapture(bytes, reviewerKey);
    await mountPlayer(ch.seq, toAsciicast(decoded, { session_id: id, channel_seq: ch.seq }));
  } catch (e) {
    recordingError(v, e);
  }
}

async function openSealedTexts() {
  for (const c of [...session.commands, ...session.files]) {
    c.text = await openSealed(c.text, reviewerKey);
  }
  for (const ch of session.channels) {
    if (ch.command && typeof ch.command !== "string") ch.command = await openSealed(ch.command, reviewerKey);
  }
}

async function useKey(file) {
  const ks = document.getElementById("keystatus");
  ks.className = "";
  ks.textContent = "";
  try {
    const key = await importReviewerKey((await file.text()));
    // A key that opens nothing is refused before anything is drawn with it.
    const probe = session.commands.find((c) => typeof c.text !== "string");
    if (probe) await openSealed(probe.text, key);
    reviewerKey = key;
    await openSealedTexts();
    drawChannels();
    ks.className = "ok";
    ks.textContent = "Key loaded (in this page only).";
  } catch (e) {
    ks.className = "error";
    ks.setAttribute("role", "alert");
    ks.textContent = e.message;
  }
}

function drawChannels() {
  const box = document.getElementById("channels");
  views.clear();
  box.replaceChildren(...session.channels.map(drawChannel));
  for (const ch of session.channels) {
    if (!ch.recording || !ch.recording.pty) continue;
    if (!ch.recording.sealed) loadPlain(ch);
    else if (reviewerKey) loadSealed(ch);
    else views.get(ch.seq).message.textContent = "Sealed recording: load the reviewer key above to play it.";
  }
  const files = document.querySelector("#files tbody");
  files.replaceChildren(...session.files.map((f) => el("tr", {}, el("td", {}, timeCell(f.at_ms)), el("td", {}, f.channel), el("td", { class: "mono" }, text(f.text)))));
}

async function load() {
  await start("SSH session");
  try {
    session = await api("/api/v1/sessions/" + encodeURIComponent(id) + fleetQuery);
  } catch (e) {
    showError(status, e);
    return;
  }
  document.getElementById("title").replaceChildren(`SSH session of ${session.user} to ${session.target}`);
  drawMeta(session);
  if (session.sealed) {
    document.getElementById("sealed").classList.remove("hidden");
    document.getElementById("keyfile").addEventListener("change", (ev) => {
      const f = ev.target.files[0];
      if (f) useKey(f);
    });
  }
  drawChannels();
  document.body.dataset.ready = "1";
}

load();
