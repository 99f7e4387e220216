"""The Open WebUI proof's deployment, as local processes: Redis, a stub
model server, two Open WebUI replicas (each with wsrelay-socketio in place
of python-socketio's server: one changed line) behind two wsrelay sidecars,
and nginx round-robin in front (no sticky sessions).

Used by proof.py; ``python3 stack.py up --venv V --bin B`` keeps it running
for a look in a browser (``down`` stops it).
"""

from __future__ import annotations

import difflib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: The line of open_webui/socket/main.py that creates sio in the Redis
#: branch (WEBSOCKET_MANAGER=redis, the multi-replica setup), and what it becomes.
ORIGINAL = "    sio = socketio.AsyncServer(\n"
CHANGED = "    import wsrelay_socketio; sio = wsrelay_socketio.AsyncServer(\n"

API_TOKEN = "proof-api-token"
HOOK_SECRET = "proof-hook-secret"
SECRET_KEY = "proof-webui-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def socket_main(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages/open_webui/socket/main.py"))
    if not found:
        sys.exit(f"openwebui: no open_webui in {venv} (make openwebui-proof installs it)")
    return found[0]


def patch(venv: Path, native: bool = False) -> str:
    """Applies (or, with ``native``, reverts) the one-line change; returns the diff."""
    main = socket_main(venv)
    pristine = main.with_suffix(".py.orig")
    if not pristine.exists():
        shutil.copy(main, pristine)
    before = pristine.read_text().splitlines(keepends=True)
    if before.count(ORIGINAL) != 2:
        sys.exit(f"openwebui: {pristine} is not Open WebUI 0.12.4's (sio created {before.count(ORIGINAL)}x)")
    after = list(before)
    if not native:
        after[before.index(ORIGINAL)] = CHANGED  # the first one: the WEBSOCKET_MANAGER == 'redis' branch
    main.write_text("".join(after))
    diff = list(difflib.unified_diff(before, after, "socket/main.py", "socket/main.py", n=0))
    changed = [d for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    if not native and changed != ["-" + ORIGINAL, "+" + CHANGED]:
        sys.exit(f"openwebui: the change is not one line:\n{''.join(diff)}")
    return "".join(diff)


@dataclass
class Replica:
    name: str
    app: int
    public: int
    admin: int


@dataclass
class Stack:
    venv: Path
    binary: Path
    workdir: Path
    polling: bool = False
    native: bool = False
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    redis: int = 0
    llm: int = 0
    http: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd or self.workdir,
            start_new_session=True,
        )

    def log(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]) if path.exists() else ""

    def wait_http(self, name: str, url: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not come up within {timeout}s:\n{self.log(name)}")

    def app_env(self, r: Replica) -> dict[str, str]:
        redis = f"redis://127.0.0.1:{self.redis}/0"
        return {
            "DATA_DIR": str(self.workdir / "data"),  # one database for both replicas
            "FROM_INIT_PY": "true",  # as `open-webui serve` runs it (the pip package's layout)
            "WEBUI_SECRET_KEY": SECRET_KEY,
            "REDIS_URL": redis,
            "WEBSOCKET_MANAGER": "redis",
            "WEBSOCKET_REDIS_URL": redis,
            "ENABLE_WEBSOCKET_SUPPORT": "false" if self.polling else "true",
            "ENABLE_OLLAMA_API": "false",
            "OPENAI_API_BASE_URL": f"http://127.0.0.1:{self.llm}/v1",
            "OPENAI_API_KEY": "stub",
            "ENABLE_SIGNUP": "true",
            "ENABLE_CHANNELS": "true",
            "DEFAULT_USER_ROLE": "user",
            "RAG_EMBEDDING_ENGINE": "openai",
            "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
            "ENABLE_BASE_MODELS_CACHE": "false",
            "HF_HUB_OFFLINE": "1",
            "OFFLINE_MODE": "true",
            "ENABLE_VERSION_UPDATE_CHECK": "false",
            "SCARF_NO_ANALYTICS": "true",
            "DO_NOT_TRACK": "true",
            "ANONYMIZED_TELEMETRY": "false",
            "GLOBAL_LOG_LEVEL": "WARNING",
            "WSRELAY_ADMIN_URL": f"http://127.0.0.1:{r.admin}",
            "WSRELAY_API_TOKEN": API_TOKEN,
            "WSRELAY_HOOK_SECRET": HOOK_SECRET,
        }

    def sidecar_argv(self, r: Replica) -> list[str]:
        hooks: list[str] = []
        for hook in ("connect", "message", "disconnect"):
            hooks += [f"--{hook}-hook", f"/ws/socket.io/hooks/{hook}"]
        return [
            str(self.binary),
            "--listen", f"127.0.0.1:{r.public}",
            "--admin-listen", f"127.0.0.1:{r.admin}",
            "--upstream", f"http://127.0.0.1:{r.app}",
            "--redis-url", f"redis://127.0.0.1:{self.redis}/1",
            "--node-id", r.name,
            "--advertise-url", f"http://127.0.0.1:{r.public}",
            "--socketio-path", "/ws/socket.io/",
            "--socketio-max-message-bytes", str(16 << 20),
            "--socketio-max-payload", str(16 << 20),
            "--ws-enabled", "false",
            # As Open WebUI tells python-socketio: polling only when its WebSockets are off.
            "--socketio-transports", "polling" if self.polling else "polling,websocket",
            "--api-token", API_TOKEN,
            "--hook-secret", HOOK_SECRET,
            "--hook-timeout", "60s",
            "--trusted-proxy", "127.0.0.1",
            "--upstream-timeout", "300s",
            *hooks,
        ]  # fmt: skip

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        print(patch(self.venv, self.native) or "(Open WebUI unchanged: its own Socket.IO server)", flush=True)
        self.redis, self.llm, self.http = free_port(), free_port(), free_port()
        self.spawn("redis", ["redis-server", "--port", str(self.redis), "--bind", "127.0.0.1", "--save", ""])
        self.spawn("llm", [sys.executable, str(HERE / "llm_stub.py"), "--port", str(self.llm)])
        self.wait_http("llm", f"http://127.0.0.1:{self.llm}/v1/models", 20)
        for name in ("r1", "r2"):
            r = Replica(name, free_port(), free_port(), free_port())
            self.replicas.append(r)
            uvicorn = [str(self.venv / "bin" / "python"), "-m", "uvicorn", "open_webui.main:app"]
            self.spawn(f"openwebui-{name}", [*uvicorn, "--host", "127.0.0.1", "--port", str(r.app),
                       "--forwarded-allow-ips", "*", "--log-level", "warning"], self.app_env(r))  # fmt: skip
            # The first replica runs the migrations alone.
            self.wait_http(f"openwebui-{name}", f"http://127.0.0.1:{r.app}/health")
            if not self.native:
                self.spawn(f"wsrelay-{name}", self.sidecar_argv(r))
                self.wait_http(f"wsrelay-{name}", f"http://127.0.0.1:{r.admin}/readyz?broker", 20)
        self.nginx()

    def nginx(self) -> None:
        d = self.workdir
        for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "nginx-tmp" / t).mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{r.app if self.native else r.public};" for r in self.replicas)
        (d / "nginx.conf").write_text(f"""daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/nginx-tmp/client_body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    # Round-robin, no sticky sessions.
    upstream replicas {{
{servers}
        keepalive 32;
    }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    server {{
        listen 127.0.0.1:{self.http};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 3600s;
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size 0;
        }}
    }}
}}
""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.spawn("nginx", [nginx, "-c", str(d / "nginx.conf"), "-e", str(d / "nginx-error.log")])
        self.wait_http("nginx", f"{self.url}/health", 20)

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.get(name)
        if p and p.poll() is None:
            os.killpg(p.pid, sig)

    def down(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
