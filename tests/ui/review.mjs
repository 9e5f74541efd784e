// Browser checks of the review UI, run by tests/e2e_webui.rs inside the gateway's network namespace:
// playwright-core drives Debian's chromium (no browser download). Talks to the Rust test over stdio:
// `STEP name` lines ask it to act (it answers `GO`), `CHECK` lines report, the last line is `RESULT {json}`.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import fs from "node:fs";
import path from "node:path";

const env = process.env;
const base = env.UI_URL;
const checks = [];
const timings = {};
const csp = [];
const pageErrors = [];

function check(name, ok, detail = "") {
  checks.push({ name, ok: !!ok, detail: String(detail).slice(0, 500) });
  console.log(`CHECK ${ok ? "ok" : "FAIL"} ${name} ${ok ? "" : String(detail).slice(0, 300)}`);
}

const rl = createInterface({ input: process.stdin });
const lines = rl[Symbol.asyncIterator]();
async function step(name) {
  console.log("STEP " + name);
  // The answer is `GO` and maybe a value.
  return ((await lines.next()).value ?? "").replace(/^GO ?/, "");
}

/// GET an API path in a browser context: [status, JSON body or null].
async function apiGet(ctx, p) {
  const r = await ctx.request.get(base + p);
  let body = null;
  try { body = await r.json(); } catch { /* not JSON */ }
  return [r.status(), body];
}

const rowDevices = (page, table) => page.locator(`#${table} tbody tr`).evaluateAll((rs) => rs.map((r) => r.dataset.device));

async function until(what, f, ms = 20000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

function watch(page) {
  page.on("console", (m) => {
    if (/Content.Security.Policy|Refused to (load|execute|apply|evaluate|connect)/i.test(m.text())) csp.push(page.url() + ": " + m.text().slice(0, 160));
  });
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("dialog", (d) => d.accept());
  return page;
}

async function apiLogin(ctx, name, password) {
  return ctx.request.post(base + "/api/v1/login", { data: { name, password }, headers: { "content-type": "application/json" } });
}

const shot = (page, name) => page.screenshot({ path: path.join(env.SHOTS, name + ".png"), fullPage: true });

async function formLogin(page, name, password) {
  await page.goto(base + "/ui/login");
  await page.fill("input[name=name]", name);
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
}

async function playerReady(page, ch = 1) {
  await page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
  return until("player " + ch, () => page.evaluate((c) => {
    const v = window.rampart?.views?.get(c);
    return v?.player && typeof v.player.getDuration() === "number";
  }, ch), 30000);
}

const termText = (page, ch = 1) => page.evaluate((c) => window.rampart.views.get(c).el.innerText, ch);

/// Clicks command `i` (0-based) of channel `ch`; returns the player time right after the seek, and the terminal
/// text once the command has played (the page pauses at the next command).
async function clickCommand(page, i, ch = 1) {
  await page.evaluate((c) => { window.rampart.views.get(c).seekedTo = undefined; }, ch);
  // A click can land while the freshly mounted player still resizes the layout (seen once on a loaded
  // machine: the seek never started); a user clicks again, and so does the test, at most three times, saying so.
  let t;
  for (let attempt = 1; t === undefined; attempt++) {
    await page.locator(`section[data-channel='${ch}'] .timeline li`).nth(i).click();
    try {
      t = await until("seek", () => page.evaluate((c) => window.rampart.views.get(c).seekedTo, ch), 8000);
    } catch (e) {
      if (attempt >= 3) throw e;
      console.error(`command ${i + 1} of channel ${ch}: no seek after click ${attempt}; clicking again`);
    }
  }
  const at = await page.evaluate((c) => window.rampart.views.get(c).player.getCurrentTime(), ch);
  await until("the command to play", () => page.evaluate((c) => window.rampart.views.get(c).stopped !== undefined, ch), 30000);
  await new Promise((r) => setTimeout(r, 300));
  return { t, at, text: await termText(page, ch) };
}

let browser;
try {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic"],
  });
  const newCtx = () => browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });

  // An auditor of acme signs in now and then stays idle: at the end its session must have expired.
  const idle = await newCtx();
  const idleLogin = await apiLogin(idle, "aud-acme", env.AUDITOR_PW);
  const idleAt = Date.now();
  const ctl = await idle.request.get(base + `/api/v1/sessions/${env.PLAIN}`);
  check("an auditor of the session's tenant reads it (control for scoping)", idleLogin.ok() && ctl.status() === 200, ctl.status());

  // Lockout: wrong passwords lock the account; even the right one is refused while locked.
  const page = watch(await (await newCtx()).newPage());
  await formLogin(page, "victim", "wrong password 1");
  const first = await until("message", async () => (await page.textContent("#message")) || null);
  check("a wrong password is refused as such", /wrong account name or password/.test(first), first);
  await shot(page, "login-refused");
  for (let i = 2; i <= 3; i++) {
    await page.fill("input[name=password]", "wrong password " + i);
    await page.click("button[type=submit]");
    await page.waitForTimeout(300);
  }
  await page.fill("input[name=password]", env.AUDITOR_PW);
  await page.click("button[type=submit]");
  const locked = await until("locked message", async () => {
    const t = await page.textContent("#message");
    return /locked/.test(t) ? t : null;
  });
  check("after 3 wrong passwords the account is locked, even for the right password", /locked/.test(locked), locked);

  // Sign in as the admin.
  await formLogin(page, "root", env.ROOT_PW);
  await page.waitForURL(/\/ui\/sessions/);
  await page.waitForSelector("#sessions tbody tr");
  const rows = await page.locator("#sessions tbody tr").count();
  check("the admin sees the four sessions", rows === 4, rows);
  check("without [fleet] the pages offer no All nodes switch", !(await page.isVisible("input[name=fleet]")) && (await page.locator("#sessions thead th").first().textContent()) === "Started");
  const cookies = await page.context().cookies();
  const c = cookies.find((x) => x.name === "__Host-rampart_session");
  check("session cookie is __Host-, Secure, HttpOnly, SameSite=Strict", c && c.secure && c.httpOnly && c.sameSite === "Strict", JSON.stringify(c));
  const headers = (await page.request.get(base + "/ui/sessions")).headers();
  check("strict CSP and security headers", /script-src 'self' 'wasm-unsafe-eval'/.test(headers["content-security-policy"]) &&
    !/unsafe-inline/.test(headers["content-security-policy"]) && headers["x-content-type-options"] === "nosniff" &&
    headers["x-frame-options"] === "DENY", JSON.stringify(headers));
  await shot(page, "sessions");

  // Filters, in the URL.
  const count = async (q) => {
    await page.goto(base + "/ui/sessions?" + q);
    await page.waitForSelector("#status p");
    return page.locator("#sessions tbody tr").count();
  };
  check("filter by user", (await count("user=alice%40acme.example")) === 4, "");
  check("filter by another user finds nothing", (await count("user=bob%40acme.example")) === 0, "");
  const third = await count("q=third");
  const thirdId = third === 1 ? await page.getAttribute("#sessions tbody tr", "data-session") : null;
  check("filter by command text finds the one session that ran it", third === 1 && thirdId === env.PLAIN, `${third} ${thirdId}`);
  const note = await page.textContent("#status");
  check("sealed commands are said to be unsearched", /sealed command/.test(note), note);
  await page.goto(base + "/ui/sessions?q=" + "x".repeat(3000));
  const tooLong = await until("error", async () => (await page.textContent("#status")) || null);
  check("an over-long filter query gets a clear error", /longer than/.test(tooLong), tooLong);

  // Flows of two real devices, filtered by device in the page (the filter goes into the URL) and by URL.
  const flowsT0 = Date.now();
  await page.goto(base + "/ui/flows");
  await page.waitForSelector("#status p");
  const allFlows = await rowDevices(page, "flows");
  check("the flows page lists both devices' real flows", allFlows.includes("alice") && allFlows.includes("bob"), JSON.stringify(allFlows));
  const zone = await page.textContent("#flows tbody tr td time");
  check("flow times are absolute, with the time zone", /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC[+-]\d\d:\d\d$/.test(zone), zone);
  await shot(page, "flows");
  await page.fill("#filters input[name=device]", "bob");
  await Promise.all([page.waitForURL(/device=bob/), page.click("#filters button[type=submit]")]);
  await page.waitForSelector("#status p");
  const bobFlows = await rowDevices(page, "flows");
  check("filtering flows by device in the page keeps that device's only, with the filter in the URL", bobFlows.length > 0 && bobFlows.every((d) => d === "bob"), JSON.stringify(bobFlows));
  await page.goto(base + "/ui/flows?device=alice");
  await page.waitForSelector("#status p");
  const aliceFlows = await rowDevices(page, "flows");
  check("control: the same filter through the URL keeps the other device's only", aliceFlows.length > 0 && aliceFlows.every((d) => d === "alice"), JSON.stringify(aliceFlows));
  const sshLinks = await page.locator("#flows tbody a.ssh-link").evaluateAll((as) => as.map((a) => a.getAttribute("href")));
  check("an SSH flow links to the session inspected on it", sshLinks.some((h) => h.endsWith(env.PLAIN)), JSON.stringify(sshLinks));
  await page.locator("#flows tbody a.http-link").first().click();
  await page.waitForURL(/\/ui\/http\?flow=\d+/);
  await page.waitForSelector("#status p");
  const reqs = await page.locator("#requests tbody tr").allTextContents();
  check("an HTTP flow links to its requests: the one made with curl through the gateway", reqs.length >= 1 && reqs.every((t) => t.includes(env.HTTP_PATH)) && reqs.some((t) => /GET/.test(t) && /200/.test(t)), JSON.stringify(reqs));
  await shot(page, "http");
  await page.locator("#requests tbody a.flow-link").first().click();
  await page.waitForURL(/\/ui\/flows\?id=\d+/);
  await page.waitForSelector("#status p");
  const back = await page.locator("#flows tbody tr").allTextContents();
  check("a request links back to its one flow", back.length === 1 && /inspect_http/.test(back[0]), JSON.stringify(back));
  await page.goto(base + "/ui/http?device=bob");
  await page.waitForSelector("#status p");
  const bobReqs = await page.locator("#requests tbody tr").count();
  check("the HTTP page filters by device (bob made no request)", bobReqs === 0, bobReqs);

  // The API behind them: cursor pages, bad cursors, over-long filters.
  const [, whole] = await apiGet(page, "/api/v1/flows?limit=200");
  const paged = [];
  let cursor = "";
  for (let i = 0; i < 100; i++) {
    const [st, p] = await apiGet(page, "/api/v1/flows?limit=3" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    if (st !== 200) break;
    paged.push(...p.items.map((f) => f.id));
    if (!p.next_cursor) break;
    cursor = p.next_cursor;
  }
  check("flows come in cursor pages that add up to the whole list", whole.items.length > 3 && JSON.stringify(paged) === JSON.stringify(whole.items.map((f) => f.id)), `${paged.length} vs ${whole.items.length}`);
  const badInput = {
    flowsCursor: await apiGet(page, "/api/v1/flows?cursor=nonsense"),
    httpCursor: await apiGet(page, "/api/v1/http?cursor=12:x"),
    sessionsCursor: await apiGet(page, "/api/v1/sessions?cursor=12"),
    longFilter: await apiGet(page, "/api/v1/flows?device=" + "d".repeat(300)),
    longQuery: await apiGet(page, "/api/v1/http?host=" + "h".repeat(250) + "&user=" + "u".repeat(250) + "&device=" + "d".repeat(250) + "&decision=" + "x".repeat(250) + "&tenant=" + "t".repeat(250) + "&from=" + "f".repeat(250) + "&to=" + "t".repeat(250) + "&flow=" + "1".repeat(250) + "&limit=" + "1".repeat(250)),
    unknown: await apiGet(page, "/api/v1/flows?colour=red"),
  };
  const code = (r) => `${r[0]} ${r[1]?.error}`;
  check("bad cursors and over-long filters get a 400 with a stable code", code(badInput.flowsCursor) === "400 bad_cursor" && code(badInput.httpCursor) === "400 bad_cursor" &&
    code(badInput.sessionsCursor) === "400 bad_cursor" && code(badInput.longFilter) === "400 query_too_long" && code(badInput.longQuery) === "400 query_too_long" &&
    code(badInput.unknown) === "400 bad_request", JSON.stringify(Object.fromEntries(Object.entries(badInput).map(([k, v]) => [k, code(v) + " " + v[1]?.message]))));

  // Verification: the untouched store verifies with the pinned key, and the session page says so.
  const [vst, v0] = await apiGet(page, "/api/v1/verify");
  check("verify: the untouched store is ok with the pinned key", vst === 200 && v0.status === "ok" && v0.ok === true && v0.first_break === null && v0.key.pinned === true && v0.records > 10, JSON.stringify(v0));
  timings.flows_http_verify_ms = Date.now() - flowsT0;

  // The plain session: timeline, seek, XSS probe.
  await page.goto(base + "/ui/session?id=" + env.PLAIN);
  await playerReady(page);
  const items = await page.locator("section[data-channel='1'] .timeline li").allTextContents();
  check("the timeline lists the typed commands", items.length === 6 && /echo third-\$\(\(3\+3\)\)/.test(items[2]), JSON.stringify(items));
  const r3 = await clickCommand(page, 2);
  const t3 = await page.evaluate(() => window.rampart.views.get(1).commands[2].t);
  check("clicking the third command seeks the player to it", Math.abs(r3.t - t3) < 0.01 && r3.at >= t3 - 0.2 && r3.at < t3 + 1.2, JSON.stringify({ t3, r3: { t: r3.t, at: r3.at } }));
  check("the terminal shows the third command's output and nothing after it", r3.text.includes("third-6") && !r3.text.includes("fifth-10"), r3.text.slice(-400));
  await page.click("#verify-run");
  const planVerify = await until("verify status", async () => (await page.getAttribute("#verify", "data-status")), 60000);
  check("the session page shows its records verified in the chain", planVerify === "ok" && /verified/.test(await page.textContent("#verify")), await page.textContent("#verify"));
  await shot(page, "session-plain");
  const r5 = await clickCommand(page, 4);
  check("control: the fifth command's output shows when it is clicked", r5.text.includes("fifth-10"), r5.text.slice(-300));
  const xss = await page.evaluate(() => ({
    pwned: window.pwned,
    scripts: document.querySelectorAll("main script, .timeline script, .player script").length,
    imgs: document.querySelectorAll("main img[src='x']").length,
    shown: [...document.querySelectorAll(".timeline li")].some((li) => li.textContent.includes("<script>window.pwned=1</script>")),
    inTerminal: window.rampart.views.get(1).el.innerText.includes("<script>window.pwned=1</script>"),
  }));
  check("a command containing <script> is shown as text and runs nothing", xss.pwned === undefined && xss.scripts === 0 && xss.imgs === 0 && xss.shown && xss.inTerminal, JSON.stringify(xss));

  // CSRF: a state-changing call without the token is refused; with it, it passes the check.
  const csrf = await page.evaluate(async (live) => {
    const me = await (await fetch("/api/v1/me")).json();
    const call = async (headers) => {
      const r = await fetch(`/api/v1/tokens/0000000000000000/revoke`, { method: "POST", headers, body: "{}" });
      return [r.status, (await r.json()).error];
    };
    return {
      none: await call({ "content-type": "application/json" }),
      wrong: await call({ "content-type": "application/json", "x-rampart-csrf": "forged" }),
      form: await call({ "content-type": "text/plain", "x-rampart-csrf": me.csrf }),
      ok: await call({ "content-type": "application/json", "x-rampart-csrf": me.csrf }),
      terminateNoToken: (await fetch(`/api/v1/sessions/${live}/terminate`, { method: "POST" })).status,
    };
  }, env.LIVE);
  check("a POST without the CSRF token is refused", csrf.none[0] === 403 && csrf.none[1] === "csrf_rejected" && csrf.wrong[0] === 403 && csrf.form[0] === 403 && csrf.terminateNoToken === 403, JSON.stringify(csrf));
  check("control: the same POST with the token passes the CSRF check", csrf.ok[0] === 404 && csrf.ok[1] === "not_found", JSON.stringify(csrf.ok));

  // Tenant scoping: an auditor of beta gets nothing of acme's, by URL or API.
  const beta = await newCtx();
  const betaLogin = await apiLogin(beta, "aud-beta", env.AUDITOR_PW);
  const bSession = await beta.request.get(base + `/api/v1/sessions/${env.PLAIN}`);
  const bCast = await beta.request.get(base + `/api/v1/sessions/${env.PLAIN}/channels/1/cast`);
  const bLive = await beta.request.get(base + `/api/v1/sessions/${env.LIVE}/live`);
  const bTerm = await beta.request.post(base + `/api/v1/sessions/${env.LIVE}/terminate`, { headers: { "content-type": "application/json", "x-rampart-csrf": (await (await beta.request.get(base + "/api/v1/me")).json()).csrf } });
  const bList = await (await beta.request.get(base + "/api/v1/sessions")).json();
  const bFlows = {
    tenant: await apiGet(beta, "/api/v1/flows?tenant=acme"),
    all: await apiGet(beta, "/api/v1/flows"),
    byId: await apiGet(beta, "/api/v1/flows?id=" + whole.items[0].id),
    http: await apiGet(beta, "/api/v1/http?tenant=acme"),
    httpAll: await apiGet(beta, "/api/v1/http"),
  };
  const acmeCtx = await newCtx();
  await apiLogin(acmeCtx, "aud-acme", env.AUDITOR_PW);
  const aFlows = await apiGet(acmeCtx, "/api/v1/flows?tenant=acme&id=" + whole.items[0].id);
  check("another tenant's auditor gets 404 for acme's flows and HTTP requests, and none of them in its lists", bFlows.tenant[0] === 404 && bFlows.tenant[1].error === "not_found" &&
    bFlows.http[0] === 404 && bFlows.all[0] === 200 && bFlows.all[1].items.length === 0 && bFlows.byId[1].items.length === 0 && bFlows.httpAll[1].items.length === 0,
    JSON.stringify(Object.fromEntries(Object.entries(bFlows).map(([k, v]) => [k, [v[0], v[1]?.items?.length ?? v[1]?.error]]))));
  check("control: acme's auditor gets the same flow by API", aFlows[0] === 200 && aFlows[1].items.length === 1, JSON.stringify(aFlows));
  check("another tenant's auditor gets 404 for the session, its cast, its live view and terminate", betaLogin.ok() &&
    bSession.status() === 404 && bCast.status() === 404 && bLive.status() === 404 && bTerm.status() === 404 && bList.items.length === 0,
    [bSession.status(), bCast.status(), bLive.status(), bTerm.status(), bList.items.length].join(","));
  const bPage = watch(await beta.newPage());
  await bPage.goto(base + "/ui/session?id=" + env.PLAIN);
  const bText = await until("error", async () => (await bPage.textContent("#status")) || null);
  check("... and the session page by URL says there is no such session", /no such session/.test(bText), bText);

  // An auditor (not admin) of acme cannot terminate.
  const aud = await newCtx();
  await apiLogin(aud, "aud-acme", env.AUDITOR_PW);
  const audMe = await (await aud.request.get(base + "/api/v1/me")).json();
  const audTerm = await aud.request.post(base + `/api/v1/sessions/${env.LIVE}/terminate`, { headers: { "content-type": "application/json", "x-rampart-csrf": audMe.csrf } });
  check("an auditor cannot terminate a session", audTerm.status() === 403, audTerm.status());

  // The sealed session: the key stays in the page; a file that is not a key is refused.
  await page.goto(base + "/ui/session?id=" + env.SEALED);
  await page.waitForSelector("body[data-ready='1']");
  const sealedItems = await page.locator(".timeline li").allTextContents();
  check("sealed command texts are not shown without the key", sealedItems.length >= 4 && sealedItems.every((t) => /sealed/.test(t)), JSON.stringify(sealedItems));
  await page.setInputFiles("#keyfile", env.NOT_A_KEY);
  const bad = await until("key error", async () => ((await page.getAttribute("#keystatus", "class")) === "error" ? page.textContent("#keystatus") : null));
  check("a key file that is not a key gets a clear message", /key/.test(bad) && !(await page.evaluate(() => window.rampart.views.get(1)?.player)), bad);
  await page.setInputFiles("#keyfile", env.KEY_FILE);
  await until("key loaded", async () => (await page.getAttribute("#keystatus", "class")) === "ok");
  await playerReady(page);
  const opened = await page.locator(".timeline li").allTextContents();
  check("with the key the timeline shows the commands", /echo s-three-\$\(\(3\+3\)\)/.test(opened[2] ?? ""), JSON.stringify(opened));
  const s3 = await clickCommand(page, 2);
  const st3 = await page.evaluate(() => window.rampart.views.get(1).commands[2].t);
  check("sealed: clicking the third command seeks to it and shows its output only", Math.abs(s3.t - st3) < 0.01 &&
    s3.at >= st3 - 0.2 && s3.at < st3 + 1.2 && s3.text.includes("s-three-6") && !s3.text.includes("s-four-8"), s3.text.slice(-300));
  await shot(page, "session-sealed");

  // The ssh-log-cli vectors, decrypted in the browser with the served HPKE code.
  const dir = env.VECTORS;
  const key = fs.readFileSync(path.join(dir, "reviewer_key"), "utf8");
  const vectors = fs.readdirSync(dir).filter((d) => fs.existsSync(path.join(dir, d, "capture.bin"))).map((d) => {
    const exp = path.join(dir, d, "expected");
    const read = (f) => (fs.existsSync(path.join(exp, f)) ? fs.readFileSync(path.join(exp, f)).toString("base64") : null);
    return { name: d, capture: fs.readFileSync(path.join(dir, d, "capture.bin")).toString("base64"),
      term: read("term_data.txt"), times: read("term_times.txt"), client: read("data_from_client.txt"), server: read("data_from_server.txt") };
  });
  const vres = await page.evaluate(async ({ vectors, key }) => {
    const m = await import("/ui/assets/capture.js");
    const k = await m.importReviewerKey(key);
    const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
    const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
    const out = [];
    for (const v of vectors) {
      try {
        const o = m.readerOutput(await m.decodeCapture(b64(v.capture), k));
        const ok = v.term !== null
          ? same(o.termData, b64(v.term)) && same(o.termTimes, b64(v.times))
          : same(o.client, b64(v.client)) && same(o.server, b64(v.server));
        out.push([v.name, ok]);
      } catch (e) {
        out.push([v.name, false, e.message]);
      }
    }
    const broken = b64(vectors.find((v) => v.name === "pty_session").capture);
    broken[broken.length - 20] ^= 1;
    let refused = null;
    try {
      await m.decodeCapture(broken, k);
    } catch (e) {
      refused = e.message;
    }
    return { out, refused };
  }, { vectors, key });
  check(`the ${vectors.length} ssh-log-cli vectors decrypt in the browser byte for byte`, vectors.length >= 10 && vres.out.every((r) => r[1]), JSON.stringify(vres.out));
  check("an altered vector is refused, not shown", /fails authentication|corrupt/.test(vres.refused ?? ""), vres.refused);

  // A capture corrupted on the gateway's disk is refused with a clear message.
  await step("corrupt");
  await page.goto(base + "/ui/session?id=" + env.SEALED);
  await page.waitForSelector("body[data-ready='1']");
  await page.setInputFiles("#keyfile", env.KEY_FILE);
  // The prompt to load the key shows until the key is in; wait for what the page says after that.
  const corrupt = await until("corrupt message", async () => {
    const t = await page.textContent("section[data-channel='1'] .playermsg");
    return t && !/load the reviewer key/.test(t) ? t : null;
  }, 30000);
  const noPlayer = await page.evaluate(() => !window.rampart.views.get(1).player);
  check("a corrupted capture gets a clear message and nothing is played", /does not match its chained hash/.test(corrupt) && noPlayer, corrupt);
  const chainTamper = await page.textContent("section[data-channel='1'] p.muted");
  check("... and the channel says its recording does not match the chain", /DOES NOT MATCH/.test(chainTamper), chainTamper);
  await page.click("#verify-run");
  const sealedVerify = await until("verify status", async () => (await page.getAttribute("#verify", "data-status")), 60000);
  check("... and the page's verification says the chain breaks at this session's records", sealedVerify === "broken-here" && /BROKEN/.test(await page.textContent("#verify")), await page.textContent("#verify"));

  // A 20 MB recording.
  const big0 = Date.now();
  await page.goto(base + "/ui/session?id=" + env.BIG);
  await playerReady(page);
  timings.big_load_ms = Date.now() - big0;
  const seek0 = Date.now();
  await page.evaluate(() => window.rampart.views.get(1).player.seek("90%"));
  timings.big_seek_ms = Date.now() - seek0;
  const size = await page.evaluate(() => window.rampart.views.get(1).ch.recording.size);
  timings.big_recording_bytes = size;
  check("a 20 MB recording loads and seeks", size > 19e6 && timings.big_load_ms > 0, JSON.stringify(timings));

  // Live view: the backlog, then output typed after the page opened; then the admin terminates it.
  await page.goto(base + "/ui/live?id=" + env.LIVE);
  const liveText = () => page.evaluate(() => document.querySelector("#term .xterm-rows")?.innerText ?? "");
  await until("backlog", async () => (await liveText()).includes("before-live-11"), 20000).catch(() => {});
  await step("live-open");
  const after = await until("live output", async () => ((await liveText()).includes("after-live-42") ? await liveText() : null), 30000).catch((e) => String(e));
  check("the live view streams output typed after the page opened", after.includes("after-live-42"), after.slice(-300));
  await shot(page, "live");
  await page.click("#terminate");
  await until("terminated", () => page.isVisible("#terminated"), 10000).catch(() => {});
  const ended = await until("end", () => page.isVisible("#ended"), 30000).catch(() => false);
  check("an admin terminates the live session and the view says it ended", ended, await page.textContent("#status"));
  await shot(page, "live-terminated");
  await step("terminated");

  // Devices and tokens (reusing the enrollment admin functions).
  await page.goto(base + "/ui/devices");
  await page.waitForSelector("#devices tbody tr");
  const devs = await page.locator("#devices tbody").textContent();
  check("devices are listed", /alice/.test(devs), devs);
  await page.fill("#newtoken input[name=tenant]", "acme");
  await page.fill("#newtoken input[name=user]", "carol@acme.example");
  await page.click("#newtoken button[type=submit]");
  const tok = await until("token", async () => (await page.textContent("#newtokentext").catch(() => null)));
  check("a new token is shown once", /^rpe1_/.test(tok), tok);
  await page.waitForSelector("#tokens tbody tr button");
  await page.click("#tokens tbody tr button");
  const revoked = await until("revoked", async () => ((await page.textContent("#tokens tbody")).includes("revoked") ? true : null));
  check("a token is revoked from the page", revoked, "");
  await shot(page, "devices");

  // The idle auditor's session has expired by now (idle timeout 40 s).
  const wait = 41000 - (Date.now() - idleAt);
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  const exp = await idle.request.get(base + "/api/v1/me");
  const expBody = await exp.json();
  check("an idle session expires", exp.status() === 401 && expBody.error === "session_expired", exp.status() + " " + expBody.error);
  const expPage = await idle.newPage();
  await expPage.goto(base + "/ui/sessions");
  check("... and its pages send it to the sign-in", /\/ui\/login/.test(expPage.url()), expPage.url());

  // A row altered in the store: verify reports the break at that record (before it: at the capture, later).
  const fresh = await newCtx();
  await apiLogin(fresh, "root", env.ROOT_PW);
  const [, v1] = await apiGet(fresh, "/api/v1/verify");
  const seq = Number(await step("tamper"));
  const [, v2] = await apiGet(fresh, "/api/v1/verify");
  check("verify: a row altered with sqlite breaks the chain at that record", v1.status === "broken" && v1.first_break.seq > seq &&
    v2.status === "broken" && v2.ok === false && v2.first_break.seq === seq && /flow/.test(v2.first_break.what), JSON.stringify({ seq, before: v1.first_break, after: v2.first_break }));

  check("no CSP violation and no script error in any page", csp.length === 0 && pageErrors.length === 0, JSON.stringify({ csp, pageErrors }));
} catch (e) {
  check("the browser script ran to the end", false, e.stack ?? String(e));
} finally {
  if (browser) await browser.close();
}
console.log("RESULT " + JSON.stringify({ checks, timings }));
rl.close();
process.exit(checks.every((c) => c.ok) ? 0 : 1);
