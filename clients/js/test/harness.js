// Real processes for the client's tests: wsrelay (the binary in WSRELAY_BIN,
// default target/debug/wsrelay of the repo) and redis-server, on free
// loopback ports, all killed when the test process ends.
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { once } from "node:events";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.WSRELAY_BIN ? path.resolve(ROOT, process.env.WSRELAY_BIN) : path.join(ROOT, "target/debug/wsrelay");

const children = new Set();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
});

/** Kills every process the tests started (they would keep the test process alive). */
export async function stopAll() {
  await Promise.all(
    [...children].map((c) => {
      const exited = c.exitCode !== null || c.signalCode !== null ? null : once(c, "exit");
      c.kill("SIGKILL");
      return exited;
    }),
  );
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves once `pred()` is true; rejects after `ms`. */
export async function until(pred, ms = 5000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function track(child, name) {
  children.add(child);
  let log = "";
  const onData = (d) => {
    log += d;
    if (log.length > 200_000) log = log.slice(-100_000);
  };
  child.stdout?.on("data", onData);
  child.stderr?.on("data", onData);
  const exited = new Promise((resolve) => child.once("exit", resolve));
  exited.then(() => children.delete(child));
  return {
    child,
    name,
    log: () => log,
    exited,
    async stop(signal = "SIGKILL") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

async function waitLog(proc, re, ms = 10000) {
  let m = null;
  await until(() => (m = re.exec(proc.log())) !== null || proc.child.exitCode !== null, ms, `${proc.name}: ${re}`).catch((e) => {
    throw new Error(`${e.message}\n${proc.log()}`);
  });
  if (!m) throw new Error(`${proc.name} exited:\n${proc.log()}`);
  return m;
}

export async function startRedis() {
  const port = await freePort();
  const proc = track(
    spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: ["ignore", "pipe", "pipe"] }),
    "redis-server",
  );
  await waitLog(proc, /Ready to accept connections/);
  return { ...proc, port, url: `redis://127.0.0.1:${port}/0` };
}

/**
 * Starts wsrelay with `args`; `listen`/`admin` reuse ports (a restart),
 * otherwise it binds port 0 and the log says which it got.
 */
export async function startRelay(args = [], { listen = "127.0.0.1:0", admin = "127.0.0.1:0", env = {} } = {}) {
  const proc = track(
    spawn(BIN, ["--listen", listen, "--admin-listen", admin, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, WSRELAY_LOG_LEVEL: "info", WSRELAY_UPSTREAM: "http://127.0.0.1:9", ...env },
    }),
    "wsrelay",
  );
  const m = await waitLog(proc, /listening public=(\S+) admin=(\S+)/);
  const [pub, adm] = [m[1], m[2]];
  return {
    ...proc,
    listen: pub,
    admin: adm,
    wsUrl: `ws://${pub}/ws`,
    adminUrl: `http://${adm}`,
    async api(method, p, body) {
      const r = await fetch(`http://${adm}${p}`, {
        method,
        headers: body ? { "content-type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
      });
      return { status: r.status, body: await r.json().catch(() => null) };
    },
    async metric(name) {
      const text = await (await fetch(`http://${adm}/metrics`)).text();
      const line = text.split("\n").find((l) => l.startsWith(name + " "));
      return line ? Number(line.split(" ")[1]) : undefined;
    },
  };
}

/** Collects a client's events for assertions. */
export function record(client) {
  const events = [];
  for (const e of ["state", "connected", "disconnected"]) client.on(e, (d) => events.push({ e, ...d }));
  return events;
}

/** Waits for the next `event` of an emitter (with a deadline). */
export function next(emitter, event, ms = 5000, pred = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const off = emitter.on(event, (d) => {
      if (!pred(d)) return;
      clearTimeout(timer);
      off();
      resolve(d);
    });
  });
}
