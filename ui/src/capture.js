// Opens ssh-log-cli captures in the browser with the reviewer's private key: the gateway serves the capture
// as stored and never sees the key or the plaintext. Mirrors the Rust reader (src/audit/capture/reader.rs),
// including the reference tool's reading quirks: a record length is one read call that takes what is left of
// the current block plus at most one new block, so an empty block at a record boundary ends the stream.
//
// Container: u32be meta_len ‖ base64(metadata JSON) ‖ { u32be ct_len ‖ ct }*, sealed with one HPKE base-mode
// context (DHKEM X25519 / HKDF-SHA256 / ChaCha20-Poly1305, empty info and AAD) to the tenant's reviewer key.
// Records: u32be len ‖ u8 source ‖ u32be code ‖ u64be elapsed_us ‖ data.

import { CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from "/ui/vendor/hpke-core/mod.js";
import { Chacha20Poly1305 } from "/ui/vendor/hpke-chacha20poly1305/mod.js";

export class CaptureError extends Error {}

const suite = new CipherSuite({
  kem: new DhkemX25519HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Chacha20Poly1305(),
});

/// The reviewer key file as `rampart audit keygen` / `ssh-log-cli generate-key-pair` write it: 44 base64
/// characters (32 bytes), no whitespace.
export async function importReviewerKey(text) {
  if (/\s/.test(text)) throw new CaptureError("the key file has whitespace or a newline: it must be exactly 44 base64 characters (the private key from `rampart audit keygen`)");
  let raw;
  try {
    raw = Uint8Array.from(atob(text.padEnd(Math.ceil(text.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
  } catch {
    throw new CaptureError("the key file is not base64: it is not a reviewer key (use the private key from `rampart audit keygen`)");
  }
  if (raw.length !== 32) throw new CaptureError(`the key decodes to ${raw.length} bytes; a reviewer key is 32 bytes (44 base64 characters)`);
  try {
    return await suite.kem.importKey("raw", raw.buffer, false);
  } catch (e) {
    throw new CaptureError("the browser refused the key: " + e.message);
  }
}

const be32 = (b, o) => ((b[o] << 24) >>> 0) + (b[o + 1] << 16) + (b[o + 2] << 8) + b[o + 3];

function hexBytes(s) {
  if (!/^([0-9a-fA-F]{2})*$/.test(s)) return null;
  return Uint8Array.from(s.match(/../g) ?? [], (h) => parseInt(h, 16));
}

/// Decrypts and parses a whole capture. Throws CaptureError on anything wrong: nothing of a bad capture is
/// to be shown.
export async function decodeCapture(bytes, key) {
  bytes = new Uint8Array(bytes);
  if (bytes.length < 4) throw new CaptureError("capture is corrupt or truncated: file ends inside the metadata header");
  const metaLen = be32(bytes, 0);
  if (bytes.length < 4 + metaLen) throw new CaptureError("capture is corrupt or truncated: file ends inside the metadata header");
  let header;
  try {
    header = JSON.parse(atob(new TextDecoder().decode(bytes.subarray(4, 4 + metaLen))));
  } catch {
    throw new CaptureError("capture is corrupt: the metadata header is not base64 JSON");
  }
  const enc = hexBytes(header.encapsulated_key ?? "");
  if (!enc || enc.length !== 32) throw new CaptureError("capture is corrupt: encapsulated_key is not 64 hex digits");
  let ctx;
  try {
    ctx = await suite.createRecipientContext({ recipientKey: key, enc: enc.buffer });
  } catch {
    throw new CaptureError("capture is corrupt: its encapsulated key is unusable");
  }
  let pos = 4 + metaLen;
  let blocksOpened = 0;
  let inputEof = false;
  let pending = new Uint8Array(0);
  let pendingPos = 0;
  const anomalies = [];

  async function nextBlock() {
    if (inputEof) return new Uint8Array(0);
    if (pos === bytes.length) { inputEof = true; return new Uint8Array(0); }
    if (bytes.length - pos < 4) throw new CaptureError(`capture is corrupt: ${bytes.length - pos} stray bytes after the last block`);
    const len = be32(bytes, pos);
    pos += 4;
    const index = blocksOpened;
    if (bytes.length - pos < len) throw new CaptureError(`capture is corrupt or truncated: block ${index} is cut short`);
    if (len < 16) throw new CaptureError(`capture is corrupt: block ${index} is shorter than its tag`);
    const ct = bytes.slice(pos, pos + len);
    pos += len;
    try {
      const pt = new Uint8Array(await ctx.open(ct.buffer));
      blocksOpened++;
      return pt;
    } catch {
      throw new CaptureError(index === 0
        ? "this reviewer key does not open the capture: it was encrypted to another public key (check the tenant's audit_recipient), or its first block was altered"
        : `capture is corrupt: block ${index} fails authentication (altered, reordered or from another capture)`);
    }
  }

  // One read call of the reference reader: the rest of the current block, then at most one new block.
  async function readCall(dst, want) {
    const left = pending.length - pendingPos;
    const n = Math.min(left, want);
    for (let i = 0; i < n; i++) dst.push(pending[pendingPos + i]);
    pendingPos += n;
    if (n === want) return n;
    const block = await nextBlock();
    const m = Math.min(block.length, want - n);
    for (let i = 0; i < m; i++) dst.push(block[i]);
    pending = block;
    pendingPos = m;
    return n + m;
  }

  const records = [];
  for (;;) {
    const len = [];
    const got = await readCall(len, 4);
    if (got === 0) {
      if (!inputEof) anomalies.push({ stoppedAtEmptyBlock: blocksOpened - 1, moreFollows: pos < bytes.length });
      break;
    }
    while (len.length < 4) len.push(0);
    const total = be32(len, 0);
    if (total < 13) throw new CaptureError(`capture is corrupt: record ${records.length} declares length ${total}, below 13`);
    const body = [];
    while (body.length < total) {
      if (await readCall(body, total - body.length) === 0) throw new CaptureError(`capture is corrupt or truncated: record ${records.length} is cut short`);
    }
    if (body[0] > 1) throw new CaptureError(`capture is corrupt: record ${records.length} has source ${body[0]}`);
    const b = Uint8Array.from(body);
    const code = be32(b, 1);
    const hi = be32(b, 5), lo = be32(b, 9);
    records.push({ source: b[0] === 0 ? "client" : "origin", code, elapsedUs: hi * 4294967296 + lo, data: b.subarray(13) });
  }
  return { header, records, anomalies, blocksOpened };
}

/// All bytes one side sent, in stream order.
export function dataFrom(decoded, source) {
  const parts = decoded.records.filter((r) => r.source === source).map((r) => r.data);
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

const CODE_RESIZE = 0x72730001;

/// A PTY capture as asciicast v2 text, like `rampart audit ssh export` (src/audit/review/ssh.rs write_cast).
export function toAsciicast(decoded, meta = {}) {
  const pty = decoded.header.pty;
  if (!pty) throw new CaptureError("not a terminal (PTY) recording");
  const head = { version: 2, width: pty.width, height: pty.height, timestamp: decoded.header.started_at, rampart: meta };
  if (pty.term) head.env = { TERM: pty.term };
  const lines = [JSON.stringify(head)];
  const dec = { client: new TextDecoder("utf-8"), origin: new TextDecoder("utf-8") };
  let last = 0;
  for (const r of decoded.records) {
    last = Math.max(last, r.elapsedUs);
    const t = last / 1e6;
    if (r.source === "client" && r.code === CODE_RESIZE) {
      lines.push(JSON.stringify([t, "r", new TextDecoder().decode(r.data)]));
      continue;
    }
    const s = dec[r.source].decode(r.data, { stream: true });
    if (s) lines.push(JSON.stringify([t, r.source === "origin" ? "o" : "i", s]));
  }
  const rest = dec.origin.decode();
  if (rest) lines.push(JSON.stringify([last / 1e6, "o", rest]));
  return lines.join("\n") + "\n";
}

/// A sealed audit field (`{"sealed": base64}`: a capture with one client record) opened with the key.
export async function openSealed(secret, key) {
  if (typeof secret === "string") return secret;
  const bytes = Uint8Array.from(atob(secret.sealed), (c) => c.charCodeAt(0));
  const d = await decodeCapture(bytes, key);
  return new TextDecoder().decode(dataFrom(d, "client"));
}

export async function sha256Hex(bytes) {
  const h = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(h, (b) => b.toString(16).padStart(2, "0")).join("");
}

function fixed6(x) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "NaN" : x > 0 ? "inf" : "-inf";
  // toFixed(60) is exact for an f32; round half to even at 6 decimals, as Rust's `{:.6}` does.
  const [ip, fp] = x.toFixed(60).split(".");
  const keep = ip + fp.slice(0, 6);
  const rest = fp.slice(6);
  const up = rest[0] > "5" || (rest[0] === "5" && (/[1-9]/.test(rest.slice(1)) || Number(keep.at(-1)) % 2 === 1));
  const n = (BigInt(keep) + (up ? 1n : 0n)).toString().padStart(7, "0");
  return n.slice(0, -6) + "." + n.slice(-6);
}

function dateUtc(secs) {
  const d = new Date(secs * 1000);
  const y = d.getUTCFullYear();
  const p = (n) => String(n).padStart(2, "0");
  return `${y <= 9999 ? String(y).padStart(4, "0") : "+" + y}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())}+00`;
}

/// What `ssh-log-cli decrypt` writes for this capture (src/audit/capture/render.rs reader_output), so a reviewer
/// can compare with Cloudflare's tool: {termData, termTimes} for a PTY capture, else {client, server}.
export function readerOutput(decoded) {
  const pty = decoded.header.pty;
  if (!pty) return { client: dataFrom(decoded, "client"), server: dataFrom(decoded, "origin") };
  const enc = new TextEncoder();
  const parts = [enc.encode(`Session started on ${dateUtc(decoded.header.started_at)} [TERM="${pty.term ?? "unknown"}" COLUMNS="${pty.width}" LINES="${pty.height}"]\n`)];
  let times = "";
  let prev = 0n;
  for (const r of decoded.records.filter((r) => r.source === "origin")) {
    parts.push(r.data);
    const us = BigInt(r.elapsedUs);
    const delta = Math.fround(Math.fround(Number(BigInt.asUintN(128, us - prev))) / 1e6);
    prev = us;
    times += `${fixed6(delta)} ${r.data.length}\n`;
  }
  const exit = decoded.header.exit_data;
  let trailer;
  if (!exit) trailer = "\nSession has no termination data\n";
  else if (exit.error_msg !== null && exit.error_msg !== undefined) trailer = `\nScript done on ${dateUtc(exit.timestamp)} [ERROR="${exit.error_msg}"]\n`;
  else if (exit.core_dumped) trailer = `\nScript done on ${dateUtc(exit.timestamp)} [CORE DUMPED]\n`;
  else trailer = `\nScript done on ${dateUtc(exit.timestamp)} [COMMAND_EXIT_CODE="${exit.status ?? 0}"]\n`;
  parts.push(enc.encode(trailer));
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return { termData: out, termTimes: enc.encode(times) };
}
