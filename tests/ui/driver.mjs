// A minimal headless-Chromium driver for tests/ui.rs, with no dependencies:
// the Chrome DevTools Protocol over --remote-debugging-pipe (file
// descriptors 3 and 4, NUL-separated JSON), so no websocket client and no
// npm package is needed.
//
// Usage: node driver.mjs <chromium> <user-data-dir>
// Reads one JSON command a line on stdin, answers one JSON line on stdout:
//   {"cmd":"open","url":U}             navigate and wait for the load event
//   {"cmd":"eval","expr":E}            {"value": the result of E, by value}
//   {"cmd":"screenshot","path":P}      the whole page as PNG into P
//   {"cmd":"problems"}                 {"value": console errors and warnings,
//                                       uncaught exceptions, browser log
//                                       errors and CSP violations so far}
// Every answer is {"ok":true,...} or {"ok":false,"error":...}. Stdin's end
// closes the browser.
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createInterface } from "node:readline";

const [chromium, userDataDir] = process.argv.slice(2);
const browser = spawn(chromium, [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
  "--no-first-run", "--no-default-browser-check", "--disable-extensions",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
  "--remote-debugging-pipe", "--user-data-dir=" + userDataDir, "--window-size=1280,900",
  "about:blank",
], { stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"] });

let browserLog = "";
browser.stderr.on("data", (d) => { browserLog = (browserLog + d).slice(-4000); });
browser.on("exit", (code, signal) => {
  if (!closing) fail("chromium exited (" + (code ?? signal) + "): " + browserLog);
});
let closing = false;

function fail(message) {
  process.stdout.write(JSON.stringify({ ok: false, error: message }) + "\n");
  process.exit(1);
}

// --- the protocol ---
const toBrowser = browser.stdio[3];
const fromBrowser = browser.stdio[4];
let nextId = 1;
const pending = new Map();
const waiters = [];
const problems = [];
let buffered = "";

fromBrowser.setEncoding("utf8");
fromBrowser.on("data", (chunk) => {
  buffered += chunk;
  let end;
  while ((end = buffered.indexOf("\0")) >= 0) {
    const msg = JSON.parse(buffered.slice(0, end));
    buffered = buffered.slice(end + 1);
    if (msg.id !== undefined) {
      const p = pending.get(msg.id);
      pending.delete(msg.id);
      if (!p) continue;
      if (msg.error) p.reject(new Error(msg.error.message + " (" + p.method + ")"));
      else p.resolve(msg.result);
    } else {
      event(msg);
    }
  }
});

function send(method, params = {}, sessionId) {
  const id = nextId++;
  const msg = { id, method, params };
  if (sessionId) msg.sessionId = sessionId;
  toBrowser.write(JSON.stringify(msg) + "\0");
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject, method }));
}

function nextEvent(method, timeoutMs) {
  return new Promise((resolve, reject) => {
    const w = { method, resolve };
    waiters.push(w);
    setTimeout(() => {
      const i = waiters.indexOf(w);
      if (i >= 0) {
        waiters.splice(i, 1);
        reject(new Error("no " + method + " within " + timeoutMs + " ms"));
      }
    }, timeoutMs);
  });
}

function event(msg) {
  const p = msg.params || {};
  switch (msg.method) {
    case "Runtime.consoleAPICalled":
      if (["error", "warning", "assert"].includes(p.type)) {
        problems.push("console." + p.type + ": " +
          (p.args || []).map((a) => a.value ?? a.description ?? a.type).join(" "));
      }
      break;
    case "Runtime.exceptionThrown":
      problems.push("exception: " + (p.exceptionDetails.exception?.description ?? p.exceptionDetails.text));
      break;
    case "Log.entryAdded":
      if (p.entry.level === "error" || p.entry.level === "warning") {
        problems.push("log." + p.entry.level + " (" + p.entry.source + "): " + p.entry.text +
          (p.entry.url ? " " + p.entry.url : ""));
      }
      break;
  }
  for (let i = waiters.length - 1; i >= 0; i--) {
    if (waiters[i].method === msg.method) waiters.splice(i, 1)[0].resolve(p);
  }
}

// A listener in the page for CSP violations, installed before its scripts.
const CSP_LISTENER = `
  window.__cspViolations = [];
  document.addEventListener("securitypolicyviolation", (e) =>
    window.__cspViolations.push(e.effectiveDirective + " blocked " + (e.blockedURI || "inline")));
`;

let session;
async function setUp() {
  const { targetId } = await send("Target.createTarget", { url: "about:blank" });
  ({ sessionId: session } = await send("Target.attachToTarget", { targetId, flatten: true }));
  for (const domain of ["Runtime", "Log", "Page"]) await send(domain + ".enable", {}, session);
  await send("Page.addScriptToEvaluateOnNewDocument", { source: CSP_LISTENER }, session);
  await send("Emulation.setDeviceMetricsOverride",
    { width: 1280, height: 900, deviceScaleFactor: 1, mobile: false }, session);
}

async function evaluate(expr) {
  const r = await send("Runtime.evaluate",
    { expression: expr, returnByValue: true, awaitPromise: true }, session);
  if (r.exceptionDetails) {
    throw new Error("evaluation failed: " +
      (r.exceptionDetails.exception?.description ?? r.exceptionDetails.text));
  }
  return r.result.value;
}

const commands = {
  async open({ url }) {
    const loaded = nextEvent("Page.loadEventFired", 15000);
    const nav = await send("Page.navigate", { url }, session);
    if (nav.errorText) throw new Error("navigation failed: " + nav.errorText);
    await loaded;
    return {};
  },
  async eval({ expr }) {
    return { value: await evaluate(expr) };
  },
  async screenshot({ path }) {
    // The page's content, not the empty viewport below it.
    const [width, height] = await evaluate(
      "[document.documentElement.scrollWidth, Math.ceil(document.body.getBoundingClientRect().height)]");
    const { data } = await send("Page.captureScreenshot", {
      format: "png",
      captureBeyondViewport: true,
      clip: { x: 0, y: 0, width, height, scale: 1 },
    }, session);
    writeFileSync(path, Buffer.from(data, "base64"));
    return {};
  },
  async problems() {
    const csp = (await evaluate("window.__cspViolations || []")).map((v) => "csp: " + v);
    return { value: problems.concat(csp) };
  },
};

async function main() {
  await setUp();
  process.stdout.write(JSON.stringify({ ok: true, ready: true }) + "\n");
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let reply;
    try {
      const c = JSON.parse(line);
      const run = commands[c.cmd];
      if (!run) throw new Error("unknown command " + c.cmd);
      reply = { ok: true, ...(await run(c)) };
    } catch (e) {
      reply = { ok: false, error: String(e.message || e) };
    }
    process.stdout.write(JSON.stringify(reply) + "\n");
  }
  closing = true;
  await Promise.race([send("Browser.close"), new Promise((r) => setTimeout(r, 3000))]).catch(() => {});
  browser.kill("SIGKILL");
  process.exit(0);
}

const watchdog = setTimeout(() => fail("driver gave up after 120 s"), 120000);
watchdog.unref();
main().catch((e) => fail(String(e.stack || e)));
