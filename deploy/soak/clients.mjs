// The soak's wsrelay.v1 clients (clients/js under Node): COUNT clients
// through URL, each subscribed to CHANNELS history channels, recovering by
// themselves after every drop (since = the last offset seen). Every event a
// user would see goes to OUT as one JSON line (written at once: nothing is
// lost when the process is told to stop), for soak.py's checker:
//   {"c":client,"ch":channel,"n":n,"o":offset}       a message
//   {"c":client,"ch":channel,"ev":"gap"}              told: lost beyond history
//   {"c":client,"ch":channel,"ev":"subscribed","recovered":true|false|null}
// Runs until SIGTERM. Usage: node clients.mjs OUT URL COUNT CHANNELS...
import { closeSync, openSync, writeSync } from "node:fs";
import { WsRelay } from "../../clients/js/wsrelay.js";
import WebSocket from "../../clients/js/node_modules/ws/index.js";

const [path, url, count, ...channels] = process.argv.slice(2);
const fd = openSync(path, "w");
const out = (o) => writeSync(fd, JSON.stringify(o) + "\n");
const relays = [];
for (let c = 0; c < Number(count); c++) {
  const relay = new WsRelay(url, { WebSocket, initialDelay: 200, maxDelay: 3000 });
  relay.on("state", (s) => out({ c, ch: "", ev: "state", state: s.state, reason: s.reason ?? null, t: Date.now() }));
  relay.on("connected", (w) => out({ c, ch: "", ev: "connected", node: w.connection.split(".")[0], t: Date.now() }));
  for (const ch of channels) {
    const sub = relay.subscribe(ch, (data, frame) => out({ c, ch, n: data.n, o: frame.offset }));
    sub.on("gap", () => out({ c, ch, ev: "gap" }));
    sub.on("subscribed", ({ recovered }) => out({ c, ch, ev: "subscribed", recovered: recovered ?? null }));
  }
  relay.connect();
  relays.push(relay);
}
process.on("SIGTERM", () => {
  for (const r of relays) r.close();
  closeSync(fd);
  process.exit(0);
});
