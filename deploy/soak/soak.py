#!/usr/bin/env python3
"""Chaos soak (`make soak`): random overlapping faults against three sidecars
behind a round-robin nginx, Redis with an append-only file (or a Sentinel
set: master, replica, three sentinels), an app with hooks, and clients of
both protocols that recover by themselves; an independent checker says
whether any client ever missed or repeated a message without being told.

Load: wsrelay.v1 clients (clients/js under Node) and socket.io-client ones
(polling only, polling then WebSocket, WebSocket only) on four shared
history channels, a chat channel the wsrelay.v1 clients publish to (the
app's publish hook allows it), and each on its own user:<id> channel;
publishes through /api/publish on random sidecars; presence on.
Faults, each in its own thread so they overlap: a sidecar SIGKILLed and
restarted, drained (SIGTERM) and restarted, stopped (SIGSTOP) for a few
seconds; Redis (the Sentinel master) SIGKILLed and restarted; the
subscriber connections killed (CLIENT KILL TYPE pubsub); the clients' TCP
connections into a sidecar cut (ss -K); a client that stops reading its
socket (a slow consumer). Processes only, loopback only, bounded
(SOAK_MINUTES, default 10).

The checker reads only what clients saw and what publishers were told: for
every client, channel and publisher, from its first message on, every
acknowledged message arrives exactly once and in order, or the client was
told before the next one arrived (a gap, a resubscription with
recovered:false, a Socket.IO reconnection not recovered). After the faults:
every sidecar's presence lists exactly the connected clients within the
presence expiry (15 s), the sidecars' RSS is within 10 % of its level
before the faults, and no sidecar logged an error-level line or a panic.
Anything else is a violation, printed with the channel, the message and the
client; the exit status is 1 if there is any. The seed of the random
schedule is printed: SOAK_SEED=<seed> replays it.
"""

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "deploy", "demo"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  process helpers: start, free_port, wait_for, tcp_ok, http_ok
from check import check  # noqa: E402

CHANNELS = [f"soak:{i}" for i in range(4)]
PRESENCE = [*CHANNELS, "chat:0"]
PRESENCE_EXPIRY = 15  # s: entries of a node killed without a word are gone by then
HISTORY = 'history = { size = 5000, ttl = "30m" }'
CONFIG = f"""socketio-path = "/socket.io/"
connect-hook = "/hook/connect"
publish-hook = "/hook/publish"
message-hook = "/hook/message"
disconnect-hook = "/hook/disconnect"

[[namespace]]
prefix = "soak:"
subscribe = "authenticated"
{HISTORY}
presence = true

[[namespace]]
prefix = "chat:"
subscribe = "authenticated"
publish = "hook"
{HISTORY}
presence = true

[[namespace]]
prefix = "user:"
subscribe = "owner"
{HISTORY}
"""


def redis_cli(port, *args):
    r = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5, check=False)
    return r.stdout.strip()


class Stack:
    """Redis (or a Sentinel set), the app, three sidecars, nginx: started,
    faulted and restarted by name."""

    def __init__(self, d, binary, sentinel):
        self.d, self.binary, self.sentinel = d, binary, sentinel
        self.redis = {"redis-a": demo.free_port()}
        if sentinel:
            self.redis["redis-b"] = demo.free_port()
        self.sentinels = [demo.free_port() for _ in range(3)] if sentinel else []
        self.http = demo.free_port()
        self.app = demo.free_port()
        self.sidecars = {f"wsrelay{i}": (demo.free_port(), demo.free_port()) for i in (1, 2, 3)}
        self.procs = {}
        self.restarts = collections.Counter()
        self.cfg = os.path.join(d, "wsrelay.toml")
        with open(self.cfg, "w") as f:
            f.write(CONFIG)

    def redis_url(self):
        if self.sentinel:
            hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
            return f"redis+sentinel://{hosts}/mymaster/0"
        return f"redis://127.0.0.1:{self.redis['redis-a']}/0"

    def master(self):
        """The Redis node that takes writes now (Sentinel: what a sentinel says)."""
        if not self.sentinel:
            return "redis-a"
        for port in self.sentinels:
            out = redis_cli(port, "SENTINEL", "get-master-addr-by-name", "mymaster").split()
            if len(out) == 2:
                for name, p in self.redis.items():
                    if str(p) == out[1]:
                        return name
        return "redis-a"

    def start_redis(self, name, replica_of=None):
        rd = os.path.join(self.d, f"{name}-data")
        os.makedirs(rd, exist_ok=True)
        argv = ["redis-server", "--port", str(self.redis[name]), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", rd]
        if replica_of:
            argv += ["--replicaof", "127.0.0.1", str(self.redis[replica_of])]
        p = self.procs[name] = demo.start(self.d, name, argv)
        demo.wait_for("port", lambda: demo.tcp_ok(self.redis[name]), p, self.d, name)

    def start_sentinels(self):
        for i, port in enumerate(self.sentinels):
            conf = os.path.join(self.d, f"sentinel{i}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {self.d}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {self.redis['redis-a']} 2\n"
                    "sentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n"
                )
            p = demo.start(self.d, f"sentinel{i}", ["redis-server", conf, "--sentinel"])
            demo.wait_for("port", lambda port=port: demo.tcp_ok(port), p, self.d, f"sentinel{i}")
            self.procs[f"sentinel{i}"] = p

    def start_sidecar(self, name):
        public, admin = self.sidecars[name]
        argv = [self.binary, "--listen", f"127.0.0.1:{public}", "--admin-listen", f"127.0.0.1:{admin}"]
        argv += ["--upstream", f"http://127.0.0.1:{self.app}", "--redis-url", self.redis_url()]
        argv += ["--config", self.cfg, "--node-id", name, "--log-format", "json", "--drain-timeout", "3s"]
        # A client that stops reading stops answering pings: closed 15 s on.
        argv += ["--redis-probe-timeout", "2s", "--ping-interval", "5s", "--idle-timeout", "15s"]
        argv += ["--advertise-url", f"http://127.0.0.1:{public}"]
        if name in self.procs:
            self.restarts[name] += 1
        # Registered before the wait: a sidecar that does not come back is
        # still the one stop_all() ends.
        p = self.procs[name] = demo.start(self.d, name, argv)
        demo.wait_for(
            "/readyz?broker", lambda: demo.http_ok(f"http://127.0.0.1:{admin}/readyz?broker"), p, self.d, name, 30
        )

    def start(self):
        self.start_redis("redis-a")
        if self.sentinel:
            self.start_redis("redis-b", replica_of="redis-a")
            self.start_sentinels()
        app = os.path.join(ROOT, "deploy", "soak", "app.py")
        p = demo.start(self.d, "app", [sys.executable, app, str(self.app)])
        demo.wait_for("port", lambda: demo.tcp_ok(self.app), p, self.d, "app")
        self.procs["app"] = p
        for name in self.sidecars:
            self.start_sidecar(name)
        # max_fails=0: nginx's passive marking (one failure: the server is out
        # for fail_timeout) would leave every client on "no live upstreams"
        # when kills overlap; deploy/nginx.conf says the same.
        ups = "\n".join(f"    server 127.0.0.1:{pub} max_fails=0;" for pub, _ in self.sidecars.values())
        conf = f"""worker_processes 1;
pid {self.d}/nginx.pid;
error_log {self.d}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream sidecars {{
{ups}
  }}
  server {{
    listen 127.0.0.1:{self.http};
    location / {{
      proxy_pass http://sidecars;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""
        with open(os.path.join(self.d, "nginx.conf"), "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        p = demo.start(
            self.d, "nginx", [nginx, "-p", self.d, "-c", os.path.join(self.d, "nginx.conf"), "-g", "daemon off;"]
        )
        demo.wait_for("port", lambda: demo.tcp_ok(self.http), p, self.d, "nginx")
        self.procs["nginx"] = p

    def admin(self, name):
        return f"http://127.0.0.1:{self.sidecars[name][1]}"

    def rss_kib(self, name):
        p = self.procs.get(name)
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, AttributeError):
            pass
        return 0

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class Publisher(threading.Thread):
    """Publishes n = 1, 2, … on each channel, at `rate` per second in all,
    through a random sidecar: every other one on a shared channel, the
    others on the clients' own channels in turn; remembers what was
    acknowledged."""

    def __init__(self, stack, rate, rng, users):
        super().__init__(daemon=True)
        self.stack, self.rate, self.rng, self.users = stack, rate, rng, users
        self.next = collections.Counter()
        self.acked = collections.defaultdict(list)
        self.refused = collections.defaultdict(list)
        self.offsets = {}  # (channel, n) -> the offset the 200 named
        self.running = True

    def run(self):
        names = list(self.stack.sidecars)
        i = 0
        while self.running:
            ch = CHANNELS[(i // 2) % len(CHANNELS)] if i % 2 == 0 else f"user:{self.users[(i // 2) % len(self.users)]}"
            i += 1
            self.next[ch] += 1
            n = self.next[ch]
            body = json.dumps({"channel": ch, "data": {"ch": ch, "n": n}}).encode()
            req = urllib.request.Request(
                self.stack.admin(self.rng.choice(names)) + "/api/publish",
                data=body,
                headers={"content-type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    offset = json.loads(r.read() or b"{}").get("offset")
                self.acked[ch].append(n)
                self.offsets[(ch, n)] = offset
            except (OSError, ValueError):  # an error status, no answer, or a torn body
                self.refused[ch].append(n)
            time.sleep(1 / self.rate)


def faults(stack, rng, until, log, clients, slow_targets, failed):
    """Random faults, overlapping (each runs in its own thread), until `until`.
    Each fault draws its durations from its own generator, seeded from the
    schedule's, so a seed replays the same schedule whatever the threads'
    timing. A fault that could not be carried out (a sidecar that did not
    come back) goes to `failed`."""
    names = list(stack.sidecars)
    busy = set()
    rng_of = threading.local()

    def kill(name):
        stack.procs[name].kill()
        stack.procs[name].wait()
        time.sleep(rng_of.r.uniform(0.5, 3))
        stack.start_sidecar(name)

    def drain(name):
        stack.procs[name].send_signal(signal.SIGTERM)
        stack.procs[name].wait(timeout=30)
        time.sleep(rng_of.r.uniform(0.5, 2))
        stack.start_sidecar(name)

    def freeze(name):
        stack.procs[name].send_signal(signal.SIGSTOP)
        time.sleep(rng_of.r.uniform(1, 5))
        stack.procs[name].send_signal(signal.SIGCONT)

    def redis_restart(_):
        # Sentinel: the master dies; it comes back as a replica of whichever
        # node the sentinels promoted (or as the master, if none was).
        victim = stack.master()
        stack.procs[victim].kill()
        stack.procs[victim].wait()
        time.sleep(rng_of.r.uniform(0.5, 3) if not stack.sentinel else rng_of.r.uniform(1, 6))
        now = stack.master()
        stack.start_redis(victim, replica_of=None if now == victim else now)

    def cut_clients(name):
        # The proxied client connections into that sidecar, cut (ss -K): the
        # clients see a dropped socket and reconnect through nginx.
        port = stack.sidecars[name][0]
        r = subprocess.run(
            ["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:  # a kernel without SOCK_DESTROY: say so, the count would lie
            raise RuntimeError(f"ss -K failed: {r.stderr.strip()}")

    def pubsub_kill(_):
        for port in stack.redis.values():
            redis_cli(port, "CLIENT", "KILL", "TYPE", "pubsub")

    def slow(client):
        # A client that stops reading: its queue grows, its pongs stop, the
        # sidecar closes it; when it reads again it reconnects and recovers.
        secs = rng_of.r.uniform(5, 40)
        clients.stdin.write(f"pause {client} {secs:.1f}\n".encode())
        clients.stdin.flush()
        time.sleep(secs)

    kinds = [
        ("sidecar SIGKILL + restart", kill, "sidecar"),
        ("sidecar drain + restart", drain, "sidecar"),
        ("sidecar SIGSTOP", freeze, "sidecar"),
        ("Sentinel master SIGKILL + restart" if stack.sentinel else "Redis SIGKILL + restart", redis_restart, "redis"),
        ("CLIENT KILL TYPE pubsub", pubsub_kill, "pubsub"),
        ("client TCP connections cut (ss -K)", cut_clients, "sidecar"),
        ("slow consumer (stops reading)", slow, "client"),
    ]
    threads = []
    while time.time() < until:
        time.sleep(rng.uniform(2, 8))
        label, fn, kind = rng.choice(kinds)
        pool = names if kind == "sidecar" else slow_targets if kind == "client" else [kind]
        target = rng.choice([n for n in pool if n not in busy] or [None])
        if target is None or target in busy:
            continue
        busy.add(target)
        log.append((time.time(), label, target))
        seed = rng.random()

        def run(fn=fn, target=target, label=label, seed=seed):
            rng_of.r = random.Random(seed)
            try:
                fn(target)
            except BaseException as e:  # demo.wait_for exits; the soak goes on and says so
                failed.append(f"{label} on {target} failed: {e!r}")
                print(f"soak: {failed[-1]}", flush=True)
            finally:
                busy.discard(target)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=90)


def read_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


class Connections:
    """Each client's current connection id, from the clients' events, read
    on from where the last call stopped (the file grows by ~1 GB an hour)."""

    def __init__(self, path):
        self.f, self.current, self.partial = open(path, "rb"), {}, b""

    def now(self):
        chunk = self.partial + self.f.read()
        lines = chunk.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if b'"ev":"connected"' in line:
                e = json.loads(line)
                self.current[e["c"]] = e["id"]
            elif b'"ev":"state"' in line and b'"state":"connected"' not in line:
                self.current.pop(json.loads(line)["c"], None)
        return set(self.current.values())


def presence_converged(stack, seen, clients, deadline):
    """Seconds until every sidecar lists exactly the connected clients on
    every presence channel, or the last difference seen when `deadline`
    passes."""
    start, last = time.time(), None
    conns = Connections(seen)
    while True:
        want = conns.now()
        diff = []
        if len(want) != clients:
            diff.append(f"{clients - len(want)} clients not connected")
        for name in stack.sidecars:
            for ch in PRESENCE:
                try:
                    with urllib.request.urlopen(f"{stack.admin(name)}/api/channels/{ch}/presence", timeout=5) as r:
                        got = {c["connection"] for c in json.load(r)["clients"]}
                except OSError as e:
                    diff.append(f"{name} {ch}: {e}")
                    continue
                if got != want:
                    diff.append(f"{name} {ch}: {len(got - want)} extra, {len(want - got)} missing")
        if not diff:
            return time.time() - start, None
        last = diff
        if time.time() > deadline:
            return time.time() - start, "; ".join(last[:4])
        time.sleep(1)


def metrics_line(stack, name):
    keep = (
        "wsrelay_connections ",
        "wsrelay_broker_up ",
        "wsrelay_messages_delivered_total ",
        "wsrelay_subscriptions ",
        "wsrelay_history_lives_ended_total ",
    )
    try:
        with urllib.request.urlopen(stack.admin(name) + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return " ".join(line for line in text.splitlines() if line.startswith(keep))
    except OSError as e:
        return f"metrics unavailable: {e}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10")))
    p.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "0")) or random.randrange(1 << 32))
    p.add_argument("--redis", choices=["single", "sentinel"], default=os.environ.get("SOAK_REDIS", "single"))
    p.add_argument("--clients", type=int, default=40, help="wsrelay.v1 clients")
    p.add_argument("--socketio-clients", type=int, default=21)
    p.add_argument("--rate", type=float, default=100, help="API publishes per second, all channels")
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "wsrelay"))
    p.add_argument("--dir", default=os.path.join(ROOT, "deploy", "soak", "run"))
    a = p.parse_args()
    rng = random.Random(a.seed)
    print(
        f"soak: seed {a.seed} (SOAK_SEED={a.seed} replays the schedule), {a.minutes} minutes, Redis {a.redis}",
        flush=True,
    )
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    stack = Stack(a.dir, os.path.abspath(a.bin), a.redis == "sentinel")
    users = [f"w{i}" for i in range(a.clients)] + [f"s{i}" for i in range(a.socketio_clients)]
    # The slow consumer: a client with a WebSocket to stop reading (not the polling-only ones).
    slow_targets = [u for u in users if not (u.startswith("s") and int(u[1:]) % 3 == 0)]
    seen = os.path.join(a.dir, "seen.jsonl")
    faults_log, verdicts, failed = [], [], []
    pub = Publisher(stack, a.rate, random.Random(a.seed + 1), users)
    try:
        stack.start()
        clients_log = open(os.path.join(a.dir, "clients.log"), "wb")
        argv = ["node", os.path.join(ROOT, "deploy", "soak", "clients.mjs"), seen, f"http://127.0.0.1:{stack.http}"]
        argv += [str(a.clients), str(a.socketio_clients), *CHANNELS]
        clients = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=clients_log)
        pub.start()
        time.sleep(15)  # everyone connected, buffers grown to their working size
        rss_before = {n: stack.rss_kib(n) for n in stack.sidecars}
        faults(stack, rng, time.time() + a.minutes * 60, faults_log, clients, slow_targets, failed)
        verdicts += failed
        healed = time.time()
        secs, diff = presence_converged(stack, seen, len(users), healed + PRESENCE_EXPIRY + 5)
        if diff:
            verdicts.append(f"presence did not converge within {PRESENCE_EXPIRY + 5} s of the faults: {diff}")
        time.sleep(5)
        pub.running = False
        clients.stdin.write(b"stop\n")  # the clients' own publishes end too
        clients.stdin.flush()
        pub.join()
        time.sleep(10)  # the last messages (and the answers to the last publishes) arrive
        for name in stack.sidecars:
            print(name, metrics_line(stack, name), flush=True)
        rss_after = {n: stack.rss_kib(n) for n in stack.sidecars}
        # Judged on the three together: after the faults the clients have
        # spread over the sidecars differently (reconnections go round-robin),
        # so one sidecar's share of the memory moves with its share of them.
        before, after = sum(rss_before.values()), sum(rss_after.values())
        if after > before * 1.10:
            verdicts.append(f"sidecar RSS {after} KiB after the faults, more than 10 % over {before} KiB before")
        clients.send_signal(signal.SIGTERM)
        clients.wait(timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.app}/counts", timeout=5) as r:
            hooks = json.load(r)
        events = read_events(seen)
    finally:
        pub.running = False
        stack.stop_all()
    with open(os.path.join(a.dir, "published.json"), "w") as f:
        json.dump({"acked": pub.acked, "refused": pub.refused}, f)
    expected = [(u, ch) for u in users for ch in [*CHANNELS, "chat:0", f"user:{u}"]]
    violations, totals = check(events, pub.acked, pub.refused, expected)
    errors = 0
    for name in stack.sidecars:
        with open(os.path.join(a.dir, f"{name}.log"), errors="replace") as f:
            for line in f:
                if '"level":"ERROR"' in line or "panicked" in line:
                    errors += 1
                    if errors <= 5:
                        print(f"{name}: {line.strip()[:400]}")
    kinds = collections.Counter(label for _, label, _ in faults_log)
    print(f"\n| seed | {a.seed} ({a.minutes} min, Redis {a.redis}) |\n|---|---|")
    for label, count in sorted(kinds.items()):
        print(f"| fault: {label} | {count} |")
    print(f"| clients: wsrelay.v1 / Socket.IO | {a.clients} / {a.socketio_clients} |")
    print(f"| API publishes acknowledged | {sum(len(v) for v in pub.acked.values())} |")
    print(f"| API publishes refused (503 or unreachable) | {sum(len(v) for v in pub.refused.values())} |")
    for k in (
        "client publishes acknowledged",
        "client publishes failed",
        "delivered",
        "recovered",
        "subscribed",
        "signalled",
        "delivered though refused",
        "subscriptions failed",
        "Socket.IO events acked by the app",
        "Socket.IO events unanswered",
        "slow consumers paused",
    ):
        print(f"| {k} | {totals[k]} |")
    print(f"| hook calls | {hooks} |")
    print(f"| presence converged after the faults | {secs:.1f} s |")
    print(f"| error-level log lines or panics | {errors} |")
    print(f"| sidecar RSS KiB before → after | {rss_before} → {rss_after} |")
    print(f"| sidecar restarts | {dict(stack.restarts)} |")
    print(f"| violations | {len(violations) + len(verdicts)} |")
    offsets = {(ch, "api", n): o for (ch, n), o in pub.offsets.items()}
    offsets.update(((e["ch"], e["p"], e["n"]), e.get("o")) for e in events if e.get("ev") == "acked")
    for ch, n, client, what in violations[:30]:
        p = what.split(":")[0].removeprefix("from ").split(" ")[0]
        print(f"violation: channel {ch} message {n} (offset {offsets.get((ch, p, n), '?')}) client {client}: {what}")
    for v in verdicts:
        print(f"violation: {v}")
    sys.exit(1 if violations or verdicts or errors else 0)


if __name__ == "__main__":
    main()
