// The demo stack (deploy/demo/demo.py: Redis, two app + wsrelay replicas,
// nginx round-robin) in a real headless Chromium, driven over the DevTools
// protocol: two users chat across replicas, a notification reaches only its
// user, and a page whose sidecar is killed reconnects and shows every message
// exactly once.
//
//   deploy/demo/test.sh            (WSRELAY_BIN: the binary; UPDATE_SCREENSHOT=1 rewrites docs/demo.png)
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "../../clients/js/node_modules/ws/wrapper.mjs";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = path.resolve(ROOT, process.env.WSRELAY_BIN || "target/debug/wsrelay");
const CHROMIUM = process.env.CHROMIUM || "chromium";
const dir = mkdtempSync(path.join(tmpdir(), "wsrelay-demo-"));
const demo = (...args) => execFileSync("python3", [path.join(ROOT, "deploy/demo/demo.py"), "--dir", dir, ...args], { encoding: "utf8" });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let base; // http://127.0.0.1:<nginx port>
let browser; // the Chromium process
let cdp;

/** A minimal DevTools protocol client (flat sessions). */
class CDP {
  constructor(url) {
    this.ws = new WebSocket(url, { perMessageDeflate: false });
    this.id = 0;
    this.calls = new Map();
    this.ws.on("message", (raw) => {
      const msg = JSON.parse(raw);
      const call = this.calls.get(msg.id);
      if (!call) return;
      this.calls.delete(msg.id);
      if (msg.error) call.reject(new Error(`${call.method}: ${msg.error.message}`));
      else call.resolve(msg.result);
    });
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("error", reject);
    });
  }
  send(method, params = {}, sessionId) {
    const id = ++this.id;
    this.ws.send(JSON.stringify({ id, method, params, sessionId }));
    return new Promise((resolve, reject) => this.calls.set(id, { resolve, reject, method }));
  }
  close() {
    this.ws.terminate();
  }
}

/** A page in its own browser context (own cookie jar: one user per page). */
async function openPage(user) {
  const { browserContextId } = await cdp.send("Target.createBrowserContext");
  const { targetId } = await cdp.send("Target.createTarget", { url: "about:blank", browserContextId });
  const { sessionId } = await cdp.send("Target.attachToTarget", { targetId, flatten: true });
  const page = {
    user,
    send: (m, p) => cdp.send(m, p, sessionId),
    async eval(expression) {
      const r = await this.send("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
      if (r.exceptionDetails) throw new Error(`${user}: ${expression}: ${r.exceptionDetails.exception?.description || r.exceptionDetails.text}`);
      return r.result.value;
    },
    async until(expression, what, ms = 10000) {
      const deadline = Date.now() + ms;
      for (;;) {
        try {
          if (await this.eval(expression)) return;
        } catch {
          // the page may be navigating
        }
        if (Date.now() > deadline) {
          const state = await this.eval("document.querySelector('#conn')?.outerHTML + ' ' + document.querySelector('main')?.innerText").catch((e) => e.message);
          throw new Error(`${user}: timed out waiting for ${what}\npage: ${state}`);
        }
        await sleep(50);
      }
    },
    async load() {
      await this.send("Page.navigate", { url: `${base}/?user=${user}` });
      await this.until("document.querySelector('#conn')?.dataset.state === 'connected' && !!document.querySelector('#rooms a') && document.querySelector('#chat').dataset.subscribed === 'yes'", `${user} connected`);
      return this.eval("document.querySelector('#conn').dataset.node");
    },
    messages: () => page.eval("[...document.querySelectorAll('#messages li:not(.system)')].map((li) => li.textContent)"),
    notes: () => page.eval("[...document.querySelectorAll('#notes li:not(.muted)')].map((li) => li.textContent)"),
    say: (text) => page.eval(`document.getElementById('text').value = ${JSON.stringify(text)}; document.getElementById('say').requestSubmit(); true`),
  };
  await page.send("Page.enable");
  await page.send("Network.enable");
  await page.send("Emulation.setDeviceMetricsOverride", { width: 1100, height: 640, deviceScaleFactor: 1, mobile: false });
  return page;
}

before(async () => {
  const out = demo("up", "--bin", BIN, "--http-port", "0", "--prom-port", "0", "--no-prometheus");
  base = /chat\s+(http:\/\/127\.0\.0\.1:\d+)\//.exec(out)[1];
  browser = spawn(
    CHROMIUM,
    [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-extensions",
      "--remote-debugging-address=127.0.0.1",
      "--remote-debugging-port=0",
      `--user-data-dir=${path.join(dir, "chromium")}`,
      "about:blank",
    ],
    { stdio: ["ignore", "ignore", "pipe"], detached: true }, // its own process group, killed whole
  );
  const url = await new Promise((resolve, reject) => {
    let err = "";
    const timer = setTimeout(() => reject(new Error(`chromium did not start:\n${err}`)), 20000);
    browser.stderr.on("data", (d) => {
      err += d;
      const m = /DevTools listening on (ws:\/\/\S+)/.exec(err);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    browser.once("exit", (code) => reject(new Error(`chromium exited (${code}):\n${err}`)));
  });
  cdp = new CDP(url);
  await cdp.opened;
});

after(async () => {
  await Promise.race([cdp?.send("Browser.close"), sleep(2000)]).catch(() => {});
  cdp?.close();
  try {
    process.kill(-browser.pid, "SIGKILL");
  } catch {
    // already gone
  }
  try {
    demo("down");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("two users on different replicas chat, get their own notifications, and survive a killed sidecar", async (t) => {
  const alice = await openPage("alice");
  const bob = await openPage("bob");
  const aliceNode = await alice.load();
  let bobNode = await bob.load();
  // nginx round-robins every request (page, scripts, upgrade): shift the
  // turn by one request and reload until bob's WebSocket lands on the other replica.
  for (let i = 0; i < 10 && bobNode === aliceNode; i++) {
    await fetch(`${base}/health`);
    bobNode = await bob.load();
  }
  assert.notEqual(bobNode, aliceNode, "the two pages are on different sidecars");
  assert.deepEqual([aliceNode, bobNode].sort(), ["web-1", "web-2"]);

  await t.test("chat across replicas", async () => {
    await alice.say("hi bob, from alice");
    await bob.until(`document.querySelector('#messages').innerText.includes('from alice')`, "alice's line at bob");
    await bob.say("hi alice, from bob");
    const both = ["alicehi bob, from alice", "bobhi alice, from bob"];
    await alice.until(`document.querySelectorAll('#messages li:not(.system)').length >= 2`, "two messages for alice");
    await bob.until(`document.querySelectorAll('#messages li:not(.system)').length >= 2`, "two messages for bob");
    assert.deepEqual(await alice.messages(), both);
    assert.deepEqual(await bob.messages(), both);
    // Presence: each sees both users in the lobby (across replicas).
    await alice.until(`document.querySelector('#presence').innerText.includes('bob')`, "bob in alice's presence list");
    await bob.until(`document.querySelector('#presence').innerText.includes('alice')`, "alice in bob's presence list");
  });

  await t.test("an app-side notification reaches its user only", async () => {
    // From alice's page: the app publishes to user:bob through its own sidecar.
    await alice.eval(`document.getElementById('notify-user').value = 'bob'; document.getElementById('notify').requestSubmit(); true`);
    await bob.until(`document.querySelector('#notes').innerText.includes('hello bob from alice')`, "bob's notification");
    // And straight from the app's HTTP endpoint, as a backend job would.
    const r = await fetch(`${base}/notify?user=alice`, { method: "POST" });
    assert.equal(r.status, 200);
    await alice.until(`document.querySelector('#notes').innerText.includes('hello alice')`, "alice's notification");
    await sleep(300);
    assert.deepEqual(await alice.notes(), ["hello alice"]);
    assert.deepEqual(await bob.notes(), ["hello bob from alice"]);
  });

  await t.test("a killed sidecar: the page reconnects elsewhere and shows what was sent meanwhile, once", async () => {
    const n = aliceNode === "web-1" ? 1 : 2;
    // Alice's sidecar hangs first (SIGSTOP): bob's messages are published
    // and reach Redis, but not her. Then it dies (SIGKILL): her page
    // reconnects through nginx to the other replica and recovers them.
    demo("freeze-sidecar", String(n));
    for (const i of [1, 2, 3]) await bob.say(`while alice is away ${i}`);
    await bob.until(`document.querySelectorAll('#messages li:not(.system)').length >= 5`, "bob's messages");
    await sleep(300);
    assert.equal((await alice.messages()).length, 2, "alice's hung sidecar delivered nothing");
    // Alice types the moment her page notices: the client holds it until it is back.
    await alice.eval(`window.relay.once("disconnected", () => {
      window.shownWhenAway = document.querySelector('#conn').dataset.state + ': ' + document.querySelector('#conn-text').textContent;
      document.getElementById('text').value = 'typed while offline';
      document.getElementById('say').requestSubmit();
    }); true`);
    demo("kill-sidecar", String(n));
    await alice.until(`window.chatStats.disconnects > 0`, "alice disconnected");
    assert.match(await alice.eval("window.shownWhenAway"), /^disconnected: reconnecting in/, "the indicator said so");
    await alice.until(`document.querySelector('#conn').dataset.state === 'connected'`, "alice reconnected", 20000);
    assert.equal(await alice.eval("document.querySelector('#conn').dataset.node"), bobNode, "to the surviving replica");
    assert.match(await alice.eval("document.querySelector('#conn-text').textContent"), /reconnected 1×/);

    demo("start-sidecar", String(n));
    await bob.say("after the restart");
    const expected = [
      "alicehi bob, from alice",
      "bobhi alice, from bob",
      "bobwhile alice is away 1",
      "bobwhile alice is away 2",
      "bobwhile alice is away 3",
      "alicetyped while offline",
      "bobafter the restart",
    ];
    for (const page of [alice, bob]) {
      await page.until(`document.querySelectorAll('#messages li:not(.system)').length >= ${expected.length}`, `${page.user}: all messages`);
    }
    await sleep(500);
    assert.deepEqual(await alice.messages(), expected, "alice: nothing lost, nothing twice, in order");
    assert.deepEqual(await bob.messages(), expected, "bob: the same");
    assert.equal(await alice.eval("window.chatStats.duplicates"), 0, "the page never had to drop a repeat");
    assert.equal(await alice.eval("window.chatStats.reloads"), 0, "recovered from history, no reload needed");

    // The restarted replica is back in the cluster: its app publishes
    // through it, and the message crosses Redis to alice on the other one.
    // (nginx itself retries a failed server only after its fail_timeout, 10 s.)
    const state = JSON.parse(readFileSync(path.join(dir, "state.json"), "utf8"));
    const r = await fetch(`http://127.0.0.1:${state.replicas[n].public}/notify?user=alice`, { method: "POST" });
    assert.equal(r.status, 200);
    await alice.until(`document.querySelectorAll('#notes li:not(.muted)').length === 2`, "a notification through the restarted replica");
    assert.deepEqual(await alice.notes(), ["hello alice", "hello alice"]);
  });

  // A picture of the demo for the README (rewritten with UPDATE_SCREENSHOT=1).
  await alice.eval(`document.getElementById('text').value = ''; true`);
  const { data } = await alice.send("Page.captureScreenshot", { format: "png" });
  const png = Buffer.from(data, "base64");
  assert.equal(png.subarray(1, 4).toString(), "PNG");
  assert.ok(png.length > 10000, "a real picture");
  writeFileSync(path.join(dir, "demo.png"), png);
  if (process.env.UPDATE_SCREENSHOT) writeFileSync(path.join(ROOT, "docs/demo.png"), png);
  assert.ok(readFileSync(path.join(dir, "demo.png")).length === png.length);
});
