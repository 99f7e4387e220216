#!/usr/bin/env python3
"""deploy/docker-compose.yml as local processes, no container engine.

    python3 deploy/demo/demo.py up      # Redis, 2 x (examples/app.py + wsrelay), nginx :8000, Prometheus :9090
    python3 deploy/demo/demo.py down    # stops exactly what `up` started (pid files)

The programs run with the compose file's own configuration: the services'
commands and environments are read from deploy/docker-compose.yml, nginx
runs deploy/nginx.conf, Prometheus deploy/prometheus/prometheus.yml (with
alerts.yml), the sidecars examples/wsrelay.toml. Only container host names
and ports are rewritten to loopback ports (a replica's 3000/8080/8081 live
in its own network namespace under compose; here each gets free ports), so
whatever the compose files say is what runs here, and a change that breaks
them breaks the demo (and its test).

Also, for tests: `kill-sidecar N` (SIGKILL), `freeze-sidecar N` (SIGSTOP)
and `start-sidecar N`;
`--http-port 0 --prom-port 0` pick free ports; `--dir` keeps the state
(pid files, logs, rendered configs; default deploy/demo/run).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COMPOSE = os.path.join(ROOT, "deploy", "docker-compose.yml")
REPLICAS = (1, 2)


def fail(msg):
    print(f"demo: {msg}", file=sys.stderr)
    sys.exit(1)


# --- reading the compose file ---------------------------------------------------
# A small reader for the shapes deploy/docker-compose.yml uses (block maps,
# flow lists written as JSON), so the demo needs nothing beyond Python.


def block(lines, start, indent):
    """The lines under lines[start], more indented than `indent`."""
    out = []
    for line in lines[start + 1 :]:
        if line.strip() and not line.lstrip().startswith("#") and len(line) - len(line.lstrip()) <= indent:
            break
        out.append(line)
    return out


def find_key(lines, key, indent):
    for i, line in enumerate(lines):
        if re.match(rf"^ {{{indent}}}{re.escape(key)}:(\s|$)", line):
            return i
    fail(f"{COMPOSE}: no `{key}:` at indent {indent}")


def flow_list(lines, i):
    """`key: [...]` (possibly over several lines) as a list of strings."""
    text = lines[i].split(":", 1)[1]
    j = i
    while text.count("[") > text.count("]"):
        j += 1
        text += lines[j]
    return json.loads(re.sub(r"#[^\n\"]*$", "", text.strip()))


def env_map(lines):
    env = {}
    for line in lines:
        m = re.match(r"^\s+([A-Z0-9_]+):\s*(.*?)\s*$", line)
        if m and not line.strip().startswith("#"):
            env[m.group(1)] = m.group(2).strip('"')
    return env


def expand(value):
    """${VAR:-default} as compose expands it."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1), m.group(2)), value)


def read_compose():
    lines = open(COMPOSE).read().splitlines()
    spec = {}
    x_app = block(lines, find_key(lines, "x-app", 0), 0)
    spec["app_command"] = [expand(a) for a in flow_list(x_app, find_key(x_app, "command", 2))]
    x_wsrelay = block(lines, find_key(lines, "x-wsrelay", 0), 0)
    spec["wsrelay_command"] = flow_list(x_wsrelay, find_key(x_wsrelay, "command", 2))
    volumes = block(x_wsrelay, find_key(x_wsrelay, "volumes", 2), 2)
    spec["wsrelay_volumes"] = {}
    for v in volumes:
        m = re.match(r"^\s+-\s+(\S+?):(\S+?)(:ro)?\s*$", v)
        if m:
            spec["wsrelay_volumes"][m.group(2)] = os.path.normpath(os.path.join(ROOT, "deploy", m.group(1)))
    services = block(lines, find_key(lines, "services", 0), 0)
    redis = block(services, find_key(services, "redis", 2), 2)
    spec["redis_command"] = flow_list(redis, find_key(redis, "command", 4))
    for n in REPLICAS:
        svc = block(services, find_key(services, f"wsrelay{n}", 2), 2)
        spec[f"wsrelay{n}_env"] = {k: expand(v) for k, v in env_map(block(svc, find_key(svc, "environment", 4), 4)).items()}
    nginx = block(services, find_key(services, "nginx", 2), 2)
    prom = block(services, find_key(services, "prometheus", 2), 2)
    spec["nginx_conf"] = mounted(nginx, "/etc/nginx/conf.d/default.conf")
    spec["prometheus_conf"] = mounted(prom, "/etc/prometheus/prometheus.yml")
    spec["prometheus_rules"] = mounted(prom, "/etc/prometheus/alerts.yml")
    return spec


def mounted(svc_lines, target):
    for line in svc_lines:
        m = re.match(r"^\s+-\s+(\S+?):" + re.escape(target) + r"(:ro)?\s*$", line)
        if m:
            return os.path.normpath(os.path.join(ROOT, "deploy", m.group(1)))
    fail(f"{COMPOSE}: nothing mounted at {target}")


# --- rendering: container names and ports -> loopback ports ----------------------------


class Ports:
    """Where each container address lives here."""

    def __init__(self, state):
        self.s = state

    def map(self, text, replica=None):
        s = self.s
        for n in REPLICAS:
            r = s["replicas"][str(n)]
            text = text.replace(f"app{n}:8080", f"127.0.0.1:{r['public']}")
            text = text.replace(f"app{n}:8081", f"127.0.0.1:{r['admin']}")
        if replica is not None:
            r = s["replicas"][str(replica)]
            # Inside replica N's network namespace.
            text = text.replace("127.0.0.1:3000", f"127.0.0.1:{r['app']}")
            text = text.replace("0.0.0.0:8081", f"127.0.0.1:{r['admin']}")
            text = text.replace("127.0.0.1:8081", f"127.0.0.1:{r['admin']}")
        text = text.replace("redis:6379", f"127.0.0.1:{s['redis']}")
        return text


def render(spec, state, d):
    ports = Ports(state)
    # nginx: the compose file's server block inside a main config of ours.
    conf = open(spec["nginx_conf"]).read()
    conf = ports.map(conf)
    conf = re.sub(r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{state['http']};", conf, flags=re.M)
    leftover = re.findall(r"\bapp\d:\d+|listen 80;", conf)
    if leftover:
        fail(f"{spec['nginx_conf']}: cannot map {leftover} to local ports")
    with open(os.path.join(d, "nginx-site.conf"), "w") as f:
        f.write(conf)
    for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(d, "nginx-tmp", t), exist_ok=True)
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(
            f"""# Generated by deploy/demo/demo.py around {spec['nginx_conf']}
daemon off;
worker_processes 1;
pid {d}/nginx.pid.nginx;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/nginx-tmp/client_body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    include {d}/nginx-site.conf;
}}
"""
        )
    # Prometheus: the compose file's config, targets on local ports, rules beside it.
    prom = ports.map(open(spec["prometheus_conf"]).read())
    if state.get("scrape_interval"):
        prom = re.sub(r"(scrape_interval|evaluation_interval): \S+", rf"\1: {state['scrape_interval']}", prom)
    if re.search(r"\bapp\d:\d+", prom):
        fail(f"{spec['prometheus_conf']}: cannot map its targets to local ports")
    with open(os.path.join(d, "prometheus.yml"), "w") as f:
        f.write(prom)
    shutil.copy(spec["prometheus_rules"], os.path.join(d, "alerts.yml"))


# --- processes ------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(d, name, argv, env=None, cwd=ROOT):
    log = open(os.path.join(d, f"{name}.log"), "ab")
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,  # not killed with the shell that ran `make demo`
    )
    with open(os.path.join(d, f"{name}.pid"), "w") as f:
        f.write(f"{p.pid}\n")
    return p


def wait_for(what, check, proc, d, name, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            fail(f"{name} exited ({proc.returncode}); its log, {d}/{name}.log:\n" + tail(d, name))
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    fail(f"{name}: {what} not ready within {timeout}s; {d}/{name}.log:\n" + tail(d, name))


def tail(d, name):
    try:
        return open(os.path.join(d, f"{name}.log"), errors="replace").read()[-3000:]
    except OSError:
        return ""


def http_ok(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def tcp_ok(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def sidecar_argv(spec, state, n):
    binary = state["bin"]
    args = []
    for a in spec["wsrelay_command"]:
        args.append(spec["wsrelay_volumes"].get(a, a))  # container path -> the mounted file
    return [binary, *args]


def sidecar_env(spec, state, n):
    ports = Ports(state)
    env = {k: ports.map(v, n) for k, v in spec[f"wsrelay{n}_env"].items()}
    # The Dockerfile's ENV: the public listener on 8080 of the replica.
    env["WSRELAY_LISTEN"] = f"127.0.0.1:{state['replicas'][str(n)]['public']}"
    # nginx reaches the sidecars from loopback here (compose: its private network).
    env["WSRELAY_TRUSTED_PROXY"] = "127.0.0.1/32"
    if state.get("sentinels"):
        # `make demo REDIS=sentinel`: the master found through the sentinels.
        hosts = ",".join(f"127.0.0.1:{p}" for p in state["sentinels"])
        env["WSRELAY_REDIS_URL"] = f"redis+sentinel://{hosts}/mymaster/0"
    leftover = [v for v in env.values() if re.search(r"\b(redis|app\d):\d+|0\.0\.0\.0", v)]
    if leftover:
        fail(f"{COMPOSE}: wsrelay{n}: cannot map {leftover} to local ports")
    return env


def start_sidecar(spec, state, d, n):
    name = f"wsrelay{n}"
    p = start(d, name, sidecar_argv(spec, state, n), sidecar_env(spec, state, n))
    admin = state["replicas"][str(n)]["admin"]
    wait_for("/readyz?broker", lambda: http_ok(f"http://127.0.0.1:{admin}/readyz?broker"), p, d, name)


def up(args):
    d = os.path.abspath(args.dir)
    if os.path.exists(os.path.join(d, "state.json")) and any(alive(d, n) for n in names(d)):
        fail(f"already running (state in {d}); `demo.py down` first")
    try:
        start_all(args)
    except (SystemExit, KeyboardInterrupt, Exception):
        down(args)  # a half-started demo leaves nothing behind
        raise


def start_sentinels(state, d, redis_prog):
    """A replica of the demo's Redis and three sentinels watching it as `mymaster`."""
    replica = free_port()
    rd = os.path.join(d, "replica")
    os.makedirs(rd, exist_ok=True)
    argv = [redis_prog, "--port", str(replica), "--bind", "127.0.0.1", "--dir", rd, "--replicaof", "127.0.0.1", str(state["redis"])]
    p = start(d, "redis-replica", argv)
    wait_for("port", lambda: tcp_ok(replica), p, d, "redis-replica")
    state["sentinels"] = []
    for i in (1, 2, 3):
        port = free_port()
        conf = os.path.join(d, f"sentinel{i}.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor mymaster 127.0.0.1 {state['redis']} 2\n"
                "sentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n"
            )
        p = start(d, f"sentinel{i}", [redis_prog, conf, "--sentinel"])
        wait_for("port", lambda: tcp_ok(port), p, d, f"sentinel{i}")
        state["sentinels"].append(port)
    state["replica"] = replica
    with open(os.path.join(d, "state.json")) as f:
        saved = json.load(f)
    saved.update(sentinels=state["sentinels"], replica=replica)
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump(saved, f, indent=1)
    print(f"demo: Redis master 127.0.0.1:{state['redis']}, replica 127.0.0.1:{replica}, sentinels {state['sentinels']}")
    print(f"demo: fail over with  redis-cli -p {state['sentinels'][0]} SENTINEL FAILOVER mymaster")


def start_all(args):
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        fail(f"no wsrelay binary at {binary} (cargo build --release, or --bin)")
    spec = read_compose()
    state = {
        "bin": binary,
        "http": args.http_port or free_port(),
        "prometheus": args.prom_port or free_port(),
        "redis": free_port(),
        "scrape_interval": args.scrape_interval,
        "replicas": {str(n): {"app": free_port(), "public": free_port(), "admin": free_port()} for n in REPLICAS},
    }
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump({**state, "spec": spec}, f, indent=1)
    render(spec, state, d)
    ports = Ports(state)

    redis_prog = spec["redis_command"][0]
    if not shutil.which(redis_prog):
        redis_prog = "valkey-server" if shutil.which("valkey-server") else "redis-server"
    argv = [redis_prog, *spec["redis_command"][1:], "--port", str(state["redis"]), "--bind", "127.0.0.1", "--dir", d]
    p = start(d, "redis", argv)
    wait_for("port", lambda: tcp_ok(state["redis"]), p, d, "redis")
    if args.redis == "sentinel":
        start_sentinels(state, d, redis_prog)

    for n in REPLICAS:
        cmd = [ports.map(a, n) for a in spec["app_command"]]
        cmd = [sys.executable if a == "python3" else os.path.join(ROOT, "examples", "app.py") if a == "/app/app.py" else a for a in cmd]
        cmd = [str(state["replicas"][str(n)]["app"]) if a == "3000" else a for a in cmd]
        p = start(d, f"app{n}", cmd)
        app_port = state["replicas"][str(n)]["app"]
        wait_for("/health", lambda: http_ok(f"http://127.0.0.1:{app_port}/health"), p, d, f"app{n}")
    for n in REPLICAS:
        start_sidecar(spec, state, d, n)

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = start(d, "nginx", [nginx, "-p", d, "-c", os.path.join(d, "nginx.conf")])
    wait_for("/health", lambda: http_ok(f"http://127.0.0.1:{state['http']}/health"), p, d, "nginx")

    if not args.no_prometheus:
        argv = [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={d}/prometheus.yml",
            f"--storage.tsdb.path={d}/prometheus-data",
            f"--web.listen-address=127.0.0.1:{state['prometheus']}",
        ]
        p = start(d, "prometheus", argv)
        wait_for("/-/ready", lambda: http_ok(f"http://127.0.0.1:{state['prometheus']}/-/ready"), p, d, "prometheus", 30)

    print(f"demo: chat     http://127.0.0.1:{state['http']}/?user=alice   (and ?user=bob in another browser)")
    print(f"demo: notify   curl -X POST 'http://127.0.0.1:{state['http']}/notify?user=alice'")
    if not args.no_prometheus:
        print(f"demo: metrics  http://127.0.0.1:{state['prometheus']}/   (alerts: /alerts)")
    for n in REPLICAS:
        r = state["replicas"][str(n)]
        print(f"demo: replica {n}: app 127.0.0.1:{r['app']}, wsrelay 127.0.0.1:{r['public']} (admin 127.0.0.1:{r['admin']})")
    print(f"demo: logs and pid files in {d}; stop with `make demo-stop`")


# --- stopping: exactly what `up` started ------------------------------------------------------


def names(d):
    return [f[:-4] for f in os.listdir(d) if f.endswith(".pid")] if os.path.isdir(d) else []


def pid_of(d, name):
    try:
        return int(open(os.path.join(d, f"{name}.pid")).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(d, name):
    """The pid in the file, if that process is still the one we started."""
    pid = pid_of(d, name)
    if pid is None:
        return None
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return None
    # A reused pid runs something else: leave it alone.
    expected = {"redis": "server", "redis-replica": "server", "nginx": "nginx", "prometheus": "prometheus"}.get(name)
    if name.startswith("sentinel"):
        expected = "sentinel"
    if expected is None:
        expected = "app.py" if name.startswith("app") else "wsrelay"
    return pid if expected in cmd else None


def stop(d, name, sig=signal.SIGTERM, timeout=10):
    pid = alive(d, name)
    if pid is not None:
        os.kill(pid, sig)
        deadline = time.time() + timeout
        while alive(d, name) and time.time() < deadline:
            time.sleep(0.05)
        if alive(d, name):
            os.kill(pid, signal.SIGKILL)
            while alive(d, name):
                time.sleep(0.05)
    try:
        os.remove(os.path.join(d, f"{name}.pid"))
    except OSError:
        pass


def down(args):
    d = os.path.abspath(args.dir)
    started = names(d)
    if not started:
        print(f"demo: nothing running (no pid files in {d})")
        return
    order = ["prometheus", "nginx", "wsrelay1", "wsrelay2", "app1", "app2", "sentinel1", "sentinel2", "sentinel3", "redis-replica", "redis"]
    for name in sorted(started, key=lambda n: order.index(n) if n in order else -1):
        stop(d, name)
        print(f"demo: stopped {name}")


def load(d):
    try:
        st = json.load(open(os.path.join(d, "state.json")))
    except OSError:
        fail(f"no demo state in {d}")
    return st["spec"], st


def kill_sidecar(args):
    d = os.path.abspath(args.dir)
    stop(d, f"wsrelay{args.n}", signal.SIGKILL)


def freeze_sidecar(args):
    """SIGSTOP: its sockets stay open but nothing moves (a hung node)."""
    pid = alive(os.path.abspath(args.dir), f"wsrelay{args.n}")
    if pid is None:
        fail(f"wsrelay{args.n} is not running")
    os.kill(pid, signal.SIGSTOP)


def start_sidecar_cmd(args):
    d = os.path.abspath(args.dir)
    spec, state = load(d)
    if alive(d, f"wsrelay{args.n}"):
        fail(f"wsrelay{args.n} is running")
    start_sidecar(spec, state, d, args.n)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(ROOT, "deploy", "demo", "run"), help="state, logs, rendered configs")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--bin", default=os.environ.get("WSRELAY_BIN", os.path.join(ROOT, "target", "release", "wsrelay")))
    u.add_argument("--http-port", type=int, default=8000, help="nginx (0: a free port)")
    u.add_argument("--prom-port", type=int, default=9090, help="Prometheus (0: a free port)")
    u.add_argument("--scrape-interval", default=None, help="override the config's (tests)")
    u.add_argument("--no-prometheus", action="store_true")
    u.add_argument("--redis", choices=("single", "sentinel"), default="single", help="sentinel: master, replica, 3 sentinels")
    sub.add_parser("down")
    for name in ("kill-sidecar", "freeze-sidecar", "start-sidecar"):
        k = sub.add_parser(name)
        k.add_argument("n", type=int, choices=REPLICAS)
    args = p.parse_args()
    {"up": up, "down": down, "kill-sidecar": kill_sidecar, "freeze-sidecar": freeze_sidecar, "start-sidecar": start_sidecar_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
