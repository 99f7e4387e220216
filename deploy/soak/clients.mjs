// The soak's clients, both protocols, in one Node process:
//   w<i>: wsrelay.v1 (clients/js) through BASE/ws?user=w<i>, subscribed to the
//         shared history channels, chat:0 and its own user:w<i>, recovering by
//         itself after every drop (since = the last offset seen); it publishes
//         {p, n} to chat:0 one at a time (policy `hook`: the app allows it).
//   s<i>: socket.io-client 4.8 through BASE (path /socket.io/), auth {user};
//         the connect hook puts it in the same rooms; connection-state
//         recovery after a drop; transports cycle: polling only, polling then
//         WebSocket, WebSocket only. It emits an event with an ack now and then.
// Every event a user would see goes to OUT as one JSON line (written at once:
// nothing is lost when the process is told to stop), for soak.py's checker:
//   {"c","ch","p","n","o"}                      a message (p: its publisher)
//   {"c","ch","ev":"gap"}                        told: lost beyond history
//   {"c","ch","ev":"subscribed","recovered"}     (re)subscribed; false = told
//   {"c","ch":"chat:0","ev":"acked"|"refused","p","n"}  its own publish's outcome
//   {"c","ch":"","ev":"connected","id"}          its connection id, for presence
//   {"c","ch","ev":"failed","why"}               a subscription refused for good
// stdin, one command per line: `pause <client> <seconds>` stops reading its
// WebSocket (a slow consumer); `stop` ends the clients' publishes and events
// (what they already sent still gets its answer). Runs until SIGTERM.
// Usage: node clients.mjs OUT BASE WSRELAY_COUNT SOCKETIO_COUNT CHANNELS...
import { closeSync, openSync, writeSync } from "node:fs";
import { createRequire } from "node:module";
import readline from "node:readline";
import { WsRelay } from "../../clients/js/wsrelay.js";
import WebSocket from "../../clients/js/node_modules/ws/index.js";

const require = createRequire(new URL("../../tests/socketio/package.json", import.meta.url));
const { io } = require("socket.io-client");

const [path, base, wcount, scount, ...channels] = process.argv.slice(2);
const fd = openSync(path, "w");
const out = (o) => writeSync(fd, JSON.stringify(o) + "\n");
const sockets = new Map(); // client -> () => its ws WebSocket, if it has one now
const closers = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let stopping = false;

for (let i = 0; i < Number(wcount); i++) {
  const c = `w${i}`;
  const relay = new WsRelay(`${base.replace(/^http/, "ws")}/ws?user=${c}`, { WebSocket, initialDelay: 200, maxDelay: 3000 });
  relay.on("state", (s) => out({ c, ch: "", ev: "state", state: s.state, reason: s.reason ?? null, t: Date.now() }));
  relay.on("connected", (w) => out({ c, ch: "", ev: "connected", id: w.connection, t: Date.now() }));
  for (const ch of [...channels, "chat:0", `user:${c}`]) {
    const sub = relay.subscribe(ch, (data, frame) => out({ c, ch, p: data.p ?? "api", n: data.n, o: frame.offset }));
    sub.on("gap", () => out({ c, ch, ev: "gap" }));
    sub.on("subscribed", ({ recovered }) => out({ c, ch, ev: "subscribed", recovered: recovered ?? null }));
    sub.on("error", (e) => out({ c, ch, ev: "failed", why: String(e?.code ?? e) }));
  }
  relay.connect();
  sockets.set(c, () => relay._ws);
  closers.push(() => relay.close());
  (async () => {
    // One publish at a time, so its acknowledged ones are in offset order.
    for (let n = 1; !stopping; n++) {
      await sleep(1000 + Math.random() * 2000);
      if (stopping) break;
      if (relay.state !== "connected") {
        n--;
        continue;
      }
      try {
        const r = await relay.publish("chat:0", { ch: "chat:0", p: c, n }, { timeout: 5000, buffer: false });
        out({ c, ch: "chat:0", ev: "acked", p: c, n, o: r?.offset ?? null });
      } catch (e) {
        out({ c, ch: "chat:0", ev: "refused", p: c, n, why: String(e.code ?? e) });
      }
    }
  })();
}

const transports = [["polling"], ["polling", "websocket"], ["websocket"]];
for (let i = 0; i < Number(scount); i++) {
  const c = `s${i}`;
  const socket = io(base, {
    path: "/socket.io/",
    transports: transports[i % 3],
    auth: { user: c },
    reconnectionDelay: 200,
    reconnectionDelayMax: 3000,
    timeout: 5000,
    forceNew: true,
  });
  let connectedBefore = false;
  socket.on("connect", () => {
    out({ c, ch: "", ev: "connected", id: socket.id, recovered: socket.recovered, t: Date.now() });
    if (connectedBefore) {
      for (const ch of [...channels, "chat:0", `user:${c}`]) out({ c, ch, ev: "subscribed", recovered: socket.recovered });
    }
    connectedBefore = true;
  });
  socket.on("disconnect", (reason) => out({ c, ch: "", ev: "state", state: "disconnected", reason, t: Date.now() }));
  socket.on("message", (data, offset) => out({ c, ch: data.ch, p: data.p ?? "api", n: data.n, o: offset ?? null }));
  sockets.set(c, () => socket.io.engine?.transport?.ws);
  closers.push(() => socket.disconnect());
  (async () => {
    for (let k = 1; !stopping; k++) {
      await sleep(2000 + Math.random() * 3000);
      if (stopping) break;
      if (!socket.connected) continue;
      try {
        await socket.timeout(5000).emitWithAck("work", { k });
        out({ c, ch: "", ev: "event acked" });
      } catch {
        out({ c, ch: "", ev: "event unanswered" });
      }
    }
  })();
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const [cmd, c, secs] = line.trim().split(/\s+/);
  if (cmd === "stop") {
    stopping = true;
    return;
  }
  // ws's own pause(): it stops reading the socket, and nothing in ws resumes
  // it behind our back (a raw net.Socket pause may be undone by ws).
  const ws = cmd === "pause" ? sockets.get(c)?.() : null;
  if (typeof ws?.pause !== "function") return out({ c, ch: "", ev: "pause skipped" });
  out({ c, ch: "", ev: "paused", secs: Number(secs), t: Date.now() });
  ws.pause();
  setTimeout(() => {
    ws.resume();
    out({ c, ch: "", ev: "resumed", t: Date.now() });
  }, Number(secs) * 1000);
});

process.on("SIGTERM", () => {
  stopping = true;
  for (const close of closers) close();
  closeSync(fd);
  process.exit(0);
});
