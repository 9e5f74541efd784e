// Browser check of the review UI over the fleet, run by tests/e2e_fleet_objects.rs inside node gw-a's
// namespace (playwright-core driving Debian's chromium, as review.mjs). Node gw-b recorded a sealed SSH
// session; on gw-a's pages it is listed only with "All nodes" on, under gw-b, and its recording, fetched from
// the fleet's object store, plays. Same stdio protocol as review.mjs: `STEP name` (answered `GO`), `CHECK`
// lines, then `RESULT {json}`.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import path from "node:path";

const env = process.env;
const base = env.UI_URL;
const checks = [];
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
  return ((await lines.next()).value ?? "").replace(/^GO ?/, "");
}

async function until(what, f, ms = 30000) {
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

const shot = (page, name) => page.screenshot({ path: path.join(env.SHOTS, name + ".png"), fullPage: true });
const sessionIds = (page) => page.locator("#sessions tbody tr").evaluateAll((rs) => rs.map((r) => r.dataset.session));

/// The session page of the fleet session with the reviewer key loaded; returns its first recorded channel.
async function openWithKey(page, url) {
  await page.goto(url);
  await page.waitForSelector("body[data-ready='1']", { timeout: 30000 });
  await page.setInputFiles("#keyfile", env.KEY_FILE);
  await until("the key to load", async () => /Key loaded/.test(await page.textContent("#keystatus")));
  return page.evaluate(() => [...window.rampart.views.values()].find((v) => v.ch.recording?.pty)?.ch.seq);
}

let browser;
try {
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic"],
  });
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 900 } });
  const login = await ctx.request.post(base + "/api/v1/login", { data: { name: "root", password: env.ROOT_PW }, headers: { "content-type": "application/json" } });
  check("root signs in", login.ok(), login.status());
  const page = await ctx.newPage();
  page.on("console", (m) => {
    if (/Content.Security.Policy|Refused to (load|execute|apply|evaluate|connect)/i.test(m.text())) csp.push(page.url() + ": " + m.text().slice(0, 160));
  });
  page.on("pageerror", (e) => pageErrors.push(String(e)));

  // Switch off: this node's own sessions only (the control: gw-a recorded none, so gw-b's is not there).
  await page.goto(base + "/ui/sessions");
  await page.waitForSelector("body[data-ready='1']");
  const switchShown = await page.isVisible("input[name=fleet]");
  const off = await sessionIds(page);
  check("with [fleet] the sessions page offers All nodes, off by default", switchShown && !(await page.isChecked("input[name=fleet]")), switchShown);
  check("switch off: node B's session is not listed", !off.includes(env.SESSION), JSON.stringify(off));

  // Switch on: the URL keeps it, the Node column appears, node B's session is listed under gw-b.
  await page.check("input[name=fleet]");
  await page.waitForURL(/[?&]fleet=1/);
  await page.waitForSelector("body[data-ready='1']");
  const row = page.locator(`#sessions tbody tr[data-session='${env.SESSION}']`);
  await row.waitFor({ timeout: 30000 });
  const head = await page.locator("#sessions thead th").first().textContent();
  const node = await row.locator("td").first().textContent();
  check("switch on: node B's session is listed under gw-b, in a Node column", head === "Node" && node === env.NODE && (await row.getAttribute("data-node")) === env.NODE, `${head} ${node}`);
  await page.reload();
  await page.waitForSelector("body[data-ready='1']");
  check("a reload keeps All nodes on", (await page.isChecked("input[name=fleet]")) && (await sessionIds(page)).includes(env.SESSION), page.url());
  await page.fill("input[name=node]", "gw-a");
  await page.click("#filters button[type=submit]");
  await page.waitForURL(/node=gw-a/);
  await page.waitForSelector("body[data-ready='1']");
  check("the node filter narrows (gw-a recorded nothing)", !(await sessionIds(page)).includes(env.SESSION), page.url());
  await page.fill("input[name=node]", env.NODE);
  await page.click("#filters button[type=submit]");
  await page.waitForURL(new RegExp("node=" + env.NODE));
  await page.waitForSelector(`#sessions tbody tr[data-session='${env.SESSION}']`);
  await shot(page, "fleet-sessions");

  const href = await page.locator(`#sessions tbody tr[data-session='${env.SESSION}'] a`).first().getAttribute("href");
  check("its link opens it from the fleet", /fleet=1/.test(href), href);

  // Flows: node B's SSH flow only with All nodes on, in the Node column.
  const flowNodes = () => page.locator("#flows tbody tr").evaluateAll((rs) => rs.map((r) => r.dataset.node ?? "local"));
  await page.goto(base + "/ui/flows");
  await page.waitForSelector("body[data-ready='1']");
  const flowsOff = await flowNodes();
  await page.check("input[name=fleet]");
  await page.waitForURL(/[?&]fleet=1/);
  const flowsOn = await until("node B's flow", async () => {
    const n = await flowNodes();
    return n.includes(env.NODE) ? n : null;
  }).catch((e) => String(e));
  const flowHead = await page.locator("#flows thead th").first().textContent();
  check("flows: node B's flow is listed under gw-b only with All nodes on", !flowsOff.includes(env.NODE) && Array.isArray(flowsOn) && flowHead === "Node", JSON.stringify({ flowsOff, flowsOn, flowHead }));
  await page.goto(base + "/ui/http?fleet=1");
  await page.waitForSelector("body[data-ready='1']");
  const httpHead = await page.locator("#requests thead th").first().textContent();
  const httpStatus = await page.textContent("#status");
  check("HTTP requests: All nodes lists the fleet's (a Node column, no error)", httpHead === "Node" && /of all nodes/.test(httpStatus), `${httpHead} ${httpStatus}`);

  // The session opens from the fleet, and its recording (sealed, from the bucket) plays in the page.
  const ch = await openWithKey(page, base + href);
  const nodeText = await page.textContent("#node");
  check("the session page names node gw-b", nodeText.includes(env.NODE), nodeText);
  await until("the player", () => page.evaluate((c) => typeof window.rampart.views.get(c)?.player?.getDuration() === "number", ch));
  await page.evaluate((c) => window.rampart.views.get(c).player.play(), ch);
  const played = await until("the typed text in the terminal", async () => {
    const t = await page.evaluate((c) => window.rampart.views.get(c).el.innerText, ch);
    return t.includes(env.MARKER) ? t : null;
  }, 60000).catch((e) => String(e));
  check("node B's recording plays from the fleet: the terminal shows the typed text", played.includes(env.MARKER), played);
  await shot(page, "fleet-session");

  // A changed object in the bucket: a clear message instead of a player; put back, it plays again.
  await step("tamper");
  await openWithKey(page, base + href);
  const msg = await until("the refusal", async () => {
    const m = page.locator(`section[data-channel='${ch}'] .playermsg`);
    return (await m.getAttribute("data-status")) === "unverified" ? m.textContent() : null;
  }).catch((e) => String(e));
  const hasPlayer = await page.evaluate((c) => !!window.rampart.views.get(c)?.player, ch);
  check("a recording that does not verify shows a clear message, not a player", /does not match its audit record/.test(msg) && !hasPlayer, msg);
  await shot(page, "fleet-unverified");
  await step("restore");
  await openWithKey(page, base + href);
  await until("the player again", () => page.evaluate((c) => typeof window.rampart.views.get(c)?.player?.getDuration() === "number", ch))
    .then(() => check("put back, it plays again (the control)", true))
    .catch((e) => check("put back, it plays again (the control)", false, e));

  check("no CSP violation and no script error in any page", csp.length === 0 && pageErrors.length === 0, JSON.stringify({ csp, pageErrors }));
} catch (e) {
  check("the browser script ran to the end", false, e.stack ?? String(e));
} finally {
  if (browser) await browser.close();
}
console.log("RESULT " + JSON.stringify({ checks }));
rl.close();
process.exit(checks.every((c) => c.ok) ? 0 : 1);
