// The browser client under Node, against real wsrelay processes (and a real
// redis-server where history must survive a sidecar restart).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import http from "node:http";
import net from "node:net";
import { writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import WebSocket from "ws";
import { WsRelay, WsRelayError } from "../wsrelay.js";
import { startRedis, startRelay, stopAll, sleep, until, next, record } from "./harness.js";

const dir = mkdtempSync(path.join(tmpdir(), "wsrelay-js-"));
const CONFIG = path.join(dir, "wsrelay.toml");
writeFileSync(
  CONFIG,
  `[[namespace]]
prefix = "chat:"
subscribe = "anyone"
publish = "anyone"
history = { size = 100, ttl = "10m" }
presence = true
join-leave = true
`,
);

const clients = [];
function client(url, options = {}) {
  const c = new WsRelay(url, { WebSocket, initialDelay: 100, maxDelay: 1000, ...options });
  clients.push(c);
  return c;
}
after(async () => {
  for (const c of clients) c.close();
  await stopAll();
});

test("reconnects after a sidecar restart and recovers what was published meanwhile, exactly once", async () => {
  const redis = await startRedis();
  const args = ["--config", CONFIG, "--redis-url", redis.url];
  let relay = await startRelay(args);
  const other = await startRelay(args); // publishes while the first one is down
  const c = client(relay.wsUrl);
  const events = record(c);
  const got = [];
  const sub = c.subscribe("chat:1", (data) => got.push(data.n));
  const subscribed = [];
  sub.on("subscribed", (info) => subscribed.push(info));
  c.connect();
  await sub.ready;
  assert.equal((await relay.api("POST", "/api/publish", { channel: "chat:1", data: { n: 1 } })).status, 200);
  await until(() => got.length === 1, 5000, "message 1");

  const { listen, admin } = relay;
  await relay.stop("SIGKILL");
  await next(c, "disconnected");
  assert.equal(c.state === "disconnected" || c.state === "connecting", true);
  for (const n of [2, 3]) assert.equal((await other.api("POST", "/api/publish", { channel: "chat:1", data: { n } })).status, 200);
  // A call made while disconnected waits for the connection.
  const buffered = c.publish("chat:1", { n: 4 });

  // Listening before the restart: the client may be back before startRelay returns.
  const reconnected = next(c, "connected", 10000);
  relay = await startRelay(args, { listen, admin });
  const welcome = await reconnected;
  assert.equal(welcome.reconnected, true);
  const { offset } = await buffered;
  assert.match(offset, /:/, "the buffered publish was done, with an offset");
  await until(() => got.length >= 4, 5000, "messages 2..4");
  assert.equal((await other.api("POST", "/api/publish", { channel: "chat:1", data: { n: 5 } })).status, 200);
  await until(() => got.length >= 5, 5000, "message 5");
  await sleep(200);
  assert.deepEqual(got, [1, 2, 3, 4, 5], "nothing lost, nothing twice, in order");
  assert.deepEqual(
    subscribed.map((s) => [s.recovered, s.reconnected]),
    [
      [null, false],
      [true, true],
    ],
  );
  const states = events.filter((e) => e.e === "state").map((e) => e.state);
  assert.deepEqual(states.slice(0, 3), ["connecting", "connected", "disconnected"]);
  assert.equal(states.at(-1), "connected");
  const lost = events.find((e) => e.e === "disconnected");
  assert.equal(lost.willReconnect, true);
});

test("a reconnect where history is gone says recovered:false (the app reloads)", async () => {
  let relay = await startRelay(["--config", CONFIG]); // in-memory: history dies with the process
  const c = client(relay.wsUrl);
  const got = [];
  const sub = c.subscribe("chat:2", (d) => got.push(d));
  c.connect();
  await sub.ready;
  await relay.api("POST", "/api/publish", { channel: "chat:2", data: "before" });
  await until(() => got.length === 1);
  const { listen, admin } = relay;
  await relay.stop("SIGKILL");
  const resubscribed = next(sub, "subscribed", 10000);
  relay = await startRelay(["--config", CONFIG], { listen, admin });
  const info = await resubscribed;
  assert.equal(info.recovered, false);
  assert.equal(info.reconnected, true);
});

test("draining (1001): reconnects soon, with a token read afresh", async () => {
  const secret = "test-secret-0123456789";
  const jwt = (sub) => {
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 60 })}`;
    return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
  };
  const args = ["--jwt-secret", secret, "--drain-timeout", "1s"];
  let relay = await startRelay(args);
  let calls = 0;
  const c = client(relay.wsUrl, { token: () => jwt(`user${++calls}`) });
  c.connect();
  assert.equal((await next(c, "connected")).user, "user1");
  const { listen, admin } = relay;
  const gone = next(c, "disconnected");
  await relay.stop("SIGTERM");
  const d = await gone;
  assert.equal(d.code, 1001);
  assert.equal(d.willReconnect, true);
  assert.ok(d.delay <= 200, `soon: ${d.delay} ms`);
  const reconnected = next(c, "connected", 10000);
  relay = await startRelay(args, { listen, admin });
  const w = await reconnected;
  assert.equal(w.user, `user${calls}`, "the token function was called again");
  assert.ok(calls >= 2);
});

test("send resolves to the app's answer, and rejects with `timeout` when the app is slow", async () => {
  const app = http.createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const { data } = JSON.parse(body);
      setTimeout(() => res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ echo: data.n })), data.delay);
    });
  });
  await new Promise((r) => app.listen(0, "127.0.0.1", r));
  after(() => app.close());
  const relay = await startRelay(["--upstream", `http://127.0.0.1:${app.address().port}`, "--message-hook", "/hook"]);
  const c = client(relay.wsUrl);
  c.connect();
  await next(c, "connected");
  assert.deepEqual(await c.send({ n: 1, delay: 0 }), { echo: 1 });
  const t0 = Date.now();
  await assert.rejects(c.send({ n: 2, delay: 2000 }, { timeout: 300 }), (e) => e instanceof WsRelayError && e.code === "timeout");
  const took = Date.now() - t0;
  assert.ok(took >= 290 && took < 1500, `timed out after ${took} ms`);
  assert.equal(c.state, "connected", "a timeout does not drop the connection");
});

test("disconnected by the app (1008): no reconnect, calls rejected", async () => {
  const relay = await startRelay(["--config", CONFIG]);
  const c = client(relay.wsUrl);
  const events = record(c);
  c.connect();
  const w = await next(c, "connected");
  const gone = next(c, "disconnected");
  assert.equal((await relay.api("POST", "/api/disconnect", { connection: w.connection })).status, 200);
  const d = await gone;
  assert.equal(d.code, 1008);
  assert.equal(d.willReconnect, false);
  await assert.rejects(c.publish("chat:x", 1), (e) => e.code === "disconnected", "rejected at once: nothing will reconnect");
  await sleep(1500);
  assert.equal(events.filter((e) => e.state === "connecting").length, 1, "never tried again");
  assert.equal(await relay.metric('wsrelay_connections_total{result="accepted"}'), 1);
  assert.equal(c.state, "disconnected");
});

test("a refused upgrade is not retried when its status is visible; without it, the client says so and keeps trying", async () => {
  // The connect hook refuses everyone with 401.
  const app = http.createServer((req, res) => res.writeHead(401).end());
  await new Promise((r) => app.listen(0, "127.0.0.1", r));
  after(() => app.close());
  const relay = await startRelay(["--upstream", `http://127.0.0.1:${app.address().port}`, "--connect-hook", "/connect"]);

  const a = client(relay.wsUrl);
  const ea = record(a);
  a.connect();
  const d = await next(a, "disconnected");
  assert.equal(d.willReconnect, false);
  assert.match(d.reason, /401/);
  assert.equal(ea.filter((e) => e.state === "connecting").length, 1);

  // What a browser sees: an error without a status, then close 1006.
  class BrowserLikeWebSocket extends WebSocket {
    set onerror(fn) {
      super.onerror = fn && (() => fn({}));
    }
    get onerror() {
      return super.onerror;
    }
  }
  // It cannot tell a refusal from a sidecar that is down: past
  // maxFailedOpens it says so, and keeps trying at the slowest pace.
  const b = client(relay.wsUrl, { WebSocket: BrowserLikeWebSocket, maxFailedOpens: 3, initialDelay: 20, maxDelay: 200 });
  const eb = record(b);
  b.connect();
  const db = await next(b, "disconnected", 5000, (x) => /attempts/.test(x.reason || ""));
  assert.match(db.reason, /refused or unreachable \(3 attempts\)/);
  assert.equal(db.willReconnect, true);
  assert.equal(eb.filter((e) => e.state === "connecting").length, 3);
  b.close();
});

test("the watchdog notices a connection that went silent, and reconnects", async () => {
  const relay = await startRelay(["--config", CONFIG]);
  // A TCP hop that can stop forwarding without closing: a dead network path.
  const [host, port] = relay.listen.split(":");
  let frozen = false;
  const sockets = [];
  const hop = net.createServer((down) => {
    const up = net.connect(Number(port), host);
    sockets.push({ up, down });
    down.on("data", (d) => frozen || up.write(d));
    up.on("data", (d) => frozen || down.write(d));
    const end = () => {
      down.destroy();
      up.destroy();
    };
    down.on("close", end);
    up.on("close", end);
    down.on("error", end);
    up.on("error", end);
  });
  await new Promise((r) => hop.listen(0, "127.0.0.1", r));
  after(() => {
    hop.close();
    for (const s of sockets) s.down.destroy();
  });
  const c = client(`ws://127.0.0.1:${hop.address().port}/ws`, { pingInterval: 300, pingTimeout: 400 });
  const events = record(c);
  c.connect();
  const first = await next(c, "connected");
  frozen = true;
  const t0 = Date.now();
  const d = await next(c, "disconnected", 3000);
  assert.match(d.reason, /ping/);
  assert.ok(Date.now() - t0 < 2000, "noticed within pingInterval + pingTimeout (+ a tick)");
  frozen = false;
  const again = await next(c, "connected", 5000);
  assert.notEqual(again.connection, first.connection);
  assert.ok(events.some((e) => e.e === "disconnected" && e.willReconnect));
});

test("calls made while disconnected are buffered up to maxBuffered, beyond that rejected", async () => {
  const c = client("ws://127.0.0.1:9/ws", { maxBuffered: 2, requestTimeout: 200 });
  const a = c.publish("chat:1", 1);
  const b = c.send({});
  await assert.rejects(c.presence("chat:1"), (e) => e.code === "buffer_full");
  await assert.rejects(a, (e) => e.code === "timeout");
  await assert.rejects(b, (e) => e.code === "timeout");
  // Timed-out calls leave the buffer.
  const d = c.ping({ timeout: 50 });
  await assert.rejects(d, (e) => e.code === "timeout");
});

test("presence, join and leave; unsubscribe", async () => {
  const relay = await startRelay(["--config", CONFIG]);
  const a = client(relay.wsUrl);
  const b = client(relay.wsUrl);
  a.connect();
  b.connect();
  const sa = a.subscribe("chat:p");
  await sa.ready;
  const joined = next(sa, "join");
  const sb = b.subscribe("chat:p");
  await sb.ready;
  assert.equal((await joined).connection, b.connection);
  const p = await sa.presence();
  assert.equal(p.count, 2);
  assert.deepEqual(p.clients.map((x) => x.connection).sort(), [a.connection, b.connection].sort());
  const left = next(sa, "leave");
  sb.unsubscribe();
  assert.equal((await left).connection, b.connection);
  assert.equal(sb.state, "unsubscribed");
  await assert.rejects(a.subscribe("bad channel name").ready, (e) => e.code === "bad_request");
});
